"""The paper's statements about the OOD factors, checked on a captured :class:`~oodlens.capture.Diagnosis`.

1. **Entropy lower bound** (Proposition, Factor 2): if a query's logits lie in ``[-B, B]``, its attention
   entropy over ``n`` keys is at least ``ln n - 2B``. With ``B`` the largest ``|logit|`` captured for a
   layer and head (over all sampled queries, so it bounds every sampled query's logits), the bound is
   checked at every sampled query. A tighter bound of the same kind uses the query's own logit range:
   ``H ≥ -ln max_j p_j ≥ ln n - (max - min)``. Both are loose when logits spread widely (real models have
   ``B`` of tens), so an empirical fit ``entropy ≈ a + b · ln n`` (``n`` = tokens so far) inside vs beyond
   the pretraining length shows the growth the paper plots.
2. **Logit growth** (Theorem 1, Factor 1): the running maximum of the logits over distance, up to the
   pretraining length vs over all distances, per layer (mean over heads), both for the last query (the
   paper's Fig. 1a) and over all sampled queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .capture import Diagnosis
from .display import Displayed, format_number
from .errors import OodlensError

# Entropies and logits are float32 sums over up to ~10⁵ keys: allow this much rounding before a bound fails.
BOUND_TOLERANCE = 1e-4
GROWTH_STATISTICS = {"last_query": "last_query_max", "all_sampled": "max"}


def entropy_lower_bound(diagnosis: Diagnosis) -> pd.DataFrame:
    """The Proposition ``H ≥ ln n - 2B`` at every sampled query, reported per layer and head.

    Returns:
        DataFrame ``[layer, head, logit_bound, position, n_keys, ln_n, bound, range_bound, entropy, holds,
        n_violations, range_holds]``: ``logit_bound`` is ``B``; ``position``, ``n_keys`` … ``entropy``
        describe the sampled query with the most keys (the largest ``n``), ``entropy`` being its minimum over
        windows;
        ``holds`` / ``range_holds`` say whether the bound / range bound held at *every* sampled query, and
        ``n_violations`` counts the queries where ``ln n - 2B`` did not.
    """
    logits = diagnosis.logits_by_distance()
    queries = diagnosis.max_logit_by_position()
    if logits.empty or queries.empty:
        raise OodlensError("the diagnosis holds no sampled logits: capture with at least one attention layer")
    logits["abs_max"] = np.maximum(logits["max"].abs(), logits["min"].abs())
    bound_b = logits.groupby(["layer", "head"])["abs_max"].max().rename("logit_bound")
    queries = queries.join(bound_b, on=["layer", "head"])
    queries["ln_n"] = np.log(queries["n_keys"])
    queries["bound"] = queries["ln_n"] - 2 * queries["logit_bound"]
    queries["range_bound"] = queries["ln_n"] - (queries["max_logit"] - queries["min_logit"])
    queries["violated"] = queries["entropy_min"] < queries["bound"] - BOUND_TOLERANCE
    queries["range_violated"] = queries["entropy_min"] < queries["range_bound"] - BOUND_TOLERANCE

    grouped = queries.groupby(["layer", "head"])
    largest_n = queries.sort_values(["n_keys", "position"]).groupby(["layer", "head"]).tail(1)
    report = largest_n.set_index(["layer", "head"])[
        ["logit_bound", "position", "n_keys", "ln_n", "bound", "range_bound", "entropy_min"]
    ].rename(columns={"entropy_min": "entropy"})
    report["holds"] = ~grouped["violated"].any()
    report["n_violations"] = grouped["violated"].sum().astype(np.int64)
    report["range_holds"] = ~grouped["range_violated"].any()
    return report.reset_index().sort_values(["layer", "head"], ignore_index=True)


def entropy_growth_fit(diagnosis: Diagnosis) -> pd.DataFrame:
    """Count-weighted least-squares fit ``entropy ≈ intercept + slope · ln n`` per layer, head and region.

    ``n`` is the number of tokens up to the middle of a position bin (``(bin_start + bin_end + 1) / 2``);
    regions are ``within`` (bins ending at or before the pretraining length) and ``beyond`` (bins starting
    at or after it). Under vanilla attention the paper predicts a positive slope in both; a fix that bounds
    the attended keys (LM-Infinite) flattens the ``beyond`` slope.

    Returns:
        DataFrame ``[layer, head, region, intercept, slope, n_bins]`` (NaN where a region has < 2 bins).
    """
    entropy = diagnosis.entropy_by_position()
    train_length = diagnosis.train_length
    entropy["ln_n"] = np.log((entropy["bin_start"] + entropy["bin_end"] + 1) / 2)
    regions = {"within": entropy["bin_end"] <= train_length, "beyond": entropy["bin_start"] >= train_length}
    rows = []
    for region, selected in regions.items():
        for (layer, head), bins in entropy[selected].groupby(["layer", "head"]):
            intercept, slope = _weighted_line(
                bins["ln_n"].to_numpy(), bins["mean"].to_numpy(), bins["count"].to_numpy()
            )
            rows.append((layer, head, region, intercept, slope, len(bins)))
    return pd.DataFrame(rows, columns=["layer", "head", "region", "intercept", "slope", "n_bins"])


def _weighted_line(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """``(intercept, slope)`` minimising ``Σ weight · (y - intercept - slope · x)²``."""
    if len(np.unique(x)) < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(weight))  # polyfit weights the residuals, not squares
    return float(intercept), float(slope)


def logit_growth(diagnosis: Diagnosis) -> pd.DataFrame:
    """Running maximum of logits over distance: up to the pretraining length vs over all distances.

    Per head: ``within`` = max over distance bins ending at or before the pretraining length, ``beyond`` =
    max over bins starting at or after it, ``running_max`` = the running maximum at the largest distance
    (``max(within, beyond)``) and ``increase = running_max - within``; per layer, ``ratio`` is the mean
    ``running_max`` over the mean ``within`` (NaN where that is ≤ 0). Two statistics: ``last_query`` (the
    last token's logits, the paper's Fig. 1a) and ``all_sampled`` (every sampled query).

    Returns:
        DataFrame ``[layer, statistic, within, beyond, running_max, increase, heads_exceeding, ratio]``,
        means over heads; ``heads_exceeding`` is the fraction of heads whose ``beyond`` exceeds ``within``.
    """
    logits = diagnosis.logits_by_distance()
    train_length = diagnosis.train_length
    rows = []
    for statistic, column in GROWTH_STATISTICS.items():
        within = logits[logits["bin_end"] <= train_length].groupby(["layer", "head"])[column].max()
        beyond = logits[logits["bin_start"] >= train_length].groupby(["layer", "head"])[column].max()
        heads = pd.DataFrame({"within": within, "beyond": beyond})
        heads["running_max"] = heads[["within", "beyond"]].max(axis=1, skipna=False)
        heads["increase"] = heads["running_max"] - heads["within"]
        heads["heads_exceeding"] = (
            (heads["beyond"] > heads["within"]).astype(float).where(heads["beyond"].notna())
        )
        per_layer = heads.groupby(level="layer").mean()
        # A ratio of head means: per-head ratios explode for heads whose maximum is near zero.
        per_layer["ratio"] = (per_layer["running_max"] / per_layer["within"]).where(per_layer["within"] > 0)
        per_layer.insert(0, "statistic", statistic)
        rows.append(per_layer.reset_index())
    return pd.concat(rows, ignore_index=True)


@dataclass(repr=False)
class TheoryReport(Displayed):
    """The paper's statements checked on one diagnosis (see the module docstring)."""

    entropy_bound: pd.DataFrame
    entropy_fit: pd.DataFrame
    logit_growth: pd.DataFrame

    def headline(self) -> dict[str, Any]:
        summary = self.summary()
        keys = (
            "entropy_bound_holds",
            "entropy_slope_within",
            "entropy_slope_beyond",
            "logit_ratio_last_query",
        )
        return {key: summary[key] for key in keys if key in summary}

    def to_dataframe(self, kind: str) -> pd.DataFrame:
        """``"entropy_bound"``, ``"entropy_fit"`` or ``"logit_growth"``."""
        if kind not in ("entropy_bound", "entropy_fit", "logit_growth"):
            raise OodlensError(
                f"unknown theory table {kind!r}; choose entropy_bound, entropy_fit or logit_growth"
            )
        return getattr(self, kind).copy()

    def summary(self) -> dict[str, float | bool | int]:
        """Headline numbers: whether the bounds held, how loose they are, entropy slopes, logit growth."""
        bound = self.entropy_bound
        result: dict[str, float | bool | int] = {
            "entropy_bound_holds": bool(bound["holds"].all()),
            "entropy_bound_violations": int(bound["n_violations"].sum()),
            "entropy_range_bound_holds": bool(bound["range_holds"].all()),
            "logit_bound_mean": float(bound["logit_bound"].mean()),
            "entropy_bound_mean_gap": float((bound["entropy"] - bound["bound"]).mean()),
        }
        for region, rows in self.entropy_fit.groupby("region"):
            result[f"entropy_slope_{region}"] = float(rows["slope"].mean())
        for statistic, rows in self.logit_growth.groupby("statistic"):
            result[f"logit_increase_{statistic}"] = float(rows["increase"].mean())
            result[f"logit_ratio_{statistic}"] = float(rows["ratio"].mean())
            result[f"heads_exceeding_{statistic}"] = float(rows["heads_exceeding"].mean())
        return result


def check_theory(diagnosis: Diagnosis) -> TheoryReport:
    """Check the entropy bound, fit the entropy growth and measure the logit growth of ``diagnosis``."""
    return TheoryReport(
        entropy_lower_bound(diagnosis), entropy_growth_fit(diagnosis), logit_growth(diagnosis)
    )


# A linear probe that tells the starting tokens from the rest this well (ROC-AUC) says they sit apart.
SEPARABLE_AUC = 0.9


@dataclass(frozen=True)
class Finding:
    """Whether one OOD factor shows in a diagnosis, with the two numbers that decide it."""

    factor: int
    shows: bool
    within: float  # the in-distribution reference
    beyond: float  # the same statistic beyond the pretraining length (factor 3: the probe's best ROC-AUC)
    sentence: str


def factor_findings(summary: dict[str, Any], length: int, train_length: int) -> list[Finding]:
    """The three factors in a :meth:`Diagnosis.summary` of ``length`` tokens, each worded from its numbers.

    1. Unseen distances: the largest logit at distances beyond the pretraining length exceeds the largest at
       distances within it (logits leave the range seen in training).
    2. Too many tokens: the mean attention entropy beyond the pretraining length exceeds the mean over the
       second half of it (entropy climbs with the number of keys).
    3. Starting tokens: a linear probe on hidden states tells the first ``n_global`` positions from the rest
       (best ROC-AUC over the probed layers ≥ :data:`SEPARABLE_AUC`)."""

    def number(key: str) -> float:
        value = summary.get(key)
        return math.nan if value is None else float(value)

    findings = []
    within, beyond = number("max_logit_within"), number("max_logit_beyond")
    if math.isnan(beyond):
        sentence = (
            f"Factor 1 cannot show: no distance reaches the pretraining length ({train_length}) "
            f"at {length} tokens."
        )
        findings.append(Finding(1, False, within, beyond, sentence))
    elif beyond > within:
        sentence = (
            f"Factor 1 shows: the largest attention logit at distances beyond {train_length} is "
            f"{format_number(beyond)}, above the {format_number(within)} seen within."
        )
        findings.append(Finding(1, True, within, beyond, sentence))
    else:
        sentence = (
            f"Factor 1 does not show at {length} tokens: the largest logit at unseen distances "
            f"({format_number(beyond)}) stays below the largest within {train_length} "
            f"({format_number(within)}); "
            "longer inputs reach farther distances (try --length 2 × L or more)."
        )
        findings.append(Finding(1, False, within, beyond, sentence))
    within, beyond = number("entropy_late_within"), number("entropy_beyond")
    shows = beyond > within
    verb = "shows" if shows else "does not show"
    relation = "above" if shows else "not above"
    sentence = (
        f"Factor 2 {verb}: mean attention entropy beyond {train_length} is {format_number(beyond)} nats, "
        f"{relation} the {format_number(within)} of the second half of the pretraining length."
    )
    findings.append(Finding(2, shows, within, beyond, sentence))
    aucs = {
        key: float(value)
        for key, value in summary.items()
        if key.endswith("start_token_roc_auc") and value is not None
    }
    best_key = max(aucs, key=aucs.get, default=None)
    auc = aucs.get(best_key, math.nan)
    shows = auc >= SEPARABLE_AUC
    layer = best_key.removeprefix("probe_layer").split("_")[0] if best_key else "?"
    sink = number("sink_mass_within")
    sentence = (
        f"Factor 3 {'shows' if shows else 'does not show'}: "
        "a linear probe tells the starting tokens from the rest "
        f"with ROC-AUC {format_number(auc)} (layer {layer}), and queries within the pretraining length put "
        f"{format_number(100 * sink)}% of their attention on them."
    )
    findings.append(Finding(3, shows, sink, auc, sentence))
    return findings


__all__ = [
    "Finding",
    "TheoryReport",
    "check_theory",
    "entropy_growth_fit",
    "entropy_lower_bound",
    "factor_findings",
    "logit_growth",
]
