"""Every length-extension method on one model, by what it repairs: the three OOD factors beyond the
pretraining length L, perplexity against the truncated baseline, passkey retrieval, prefill time, decoding
time and cache memory.

:func:`compare_methods` measures it all and returns a :class:`MethodComparison`, whose :meth:`table` is the
side-by-side table and :meth:`repairs` the repair map's cells: each method's value beyond L over vanilla's
in-distribution value (1 = repaired). The pieces (:func:`measure_method`, :func:`measure_baseline`,
:func:`measure_reference`) return JSON-ready dicts, so a long comparison can cache each method on its own
(``analyses/compare_methods.py`` does) and assemble the result with :class:`MethodComparison` afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from ..capture import Diagnosis, diagnose
from ..display import Displayed, estimate_text
from ..errors import OodlensError
from ..models import train_length_of
from ..policies import Policy, vanilla
from ..stats import Estimate
from .generation import passkey_retrieval
from .perplexity import PerplexityResult, perplexity_by_position
from .scoring import TRUNCATED_BASELINE
from .speed import decode_speed
from .tasks import TaskResult, task_accuracy

# the repair map's columns, in the order of the paper's factors and then the two outcomes
REPAIRS = ("factor 1: logits", "factor 2: entropy", "factor 3: sink mass", "perplexity", "retrieval")
DEFAULT_DEPTHS = (0.25, 0.75)
DEFAULT_DECODE_STEPS = 4


def measure_method(
    model: PreTrainedModel,
    tokenizer: Any,
    windows: torch.LongTensor,
    policy: Policy,
    *,
    train_length: int,
    capture_length: int,
    passkey_lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    bucket: int,
    progress: bool = False,
) -> dict[str, Any]:
    """One method: perplexity by position over ``windows`` (and that forward's time per window), the factors
    from a capture of the first ``capture_length`` tokens, and passkey ``{length: [correct, n]}``."""
    started = time.perf_counter()
    ppl = perplexity_by_position(
        model,
        windows,
        [policy],
        train_length=train_length,
        bucket=bucket,
        truncated_baseline=False,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    diagnosis = diagnose(
        model, windows[:, :capture_length], policy, train_length=train_length, progress=progress
    )
    passkey = _passkey(model, tokenizer, [policy], passkey_lengths, depths, train_length, truncated=False)
    return {
        "description": policy.describe(train_length),
        "buckets": _buckets(ppl),
        "forward_s": seconds / windows.shape[0],
        "factors": factors_of(diagnosis),
        "passkey": passkey[policy.name],
    }


def measure_baseline(
    model: PreTrainedModel,
    tokenizer: Any,
    windows: torch.LongTensor,
    *,
    train_length: int,
    passkey_lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    bucket: int,
    progress: bool = False,
) -> dict[str, Any]:
    """The content-matched baseline: perplexity with at most L tokens of context, passkey on the prompts' last
    L tokens."""
    ppl = perplexity_by_position(
        model, windows, [], train_length=train_length, bucket=bucket, progress=progress
    )
    passkey = _passkey(model, tokenizer, [], passkey_lengths, depths, train_length, truncated=True)
    return {"buckets": _buckets(ppl), "passkey": passkey[TRUNCATED_BASELINE]}


def measure_reference(
    model: PreTrainedModel,
    tokenizer: Any,
    *,
    train_length: int,
    length: int,
    depths: Sequence[float] = DEFAULT_DEPTHS,
) -> dict[str, Any]:
    """Vanilla's passkey ``{length: [correct, n]}`` within L: the retrieval a repair is held against."""
    return _passkey(model, tokenizer, [vanilla()], [length], depths, train_length, truncated=False)["vanilla"]


def factors_of(diagnosis: Diagnosis) -> dict[str, float | None]:
    """The numbers of the three factors a comparison keeps: largest logit and late entropy within and beyond
    L, sink mass within and beyond, and the best layer's start-token ROC-AUC (None where not finite)."""
    summary = diagnosis.summary()
    keep = ("max_logit_within", "max_logit_beyond", "entropy_late_within", "entropy_beyond")
    factors = {key: summary.get(key) for key in (*keep, "sink_mass_within", "sink_mass_beyond")}
    aucs = [
        value for key, value in summary.items() if key.endswith("start_token_roc_auc") and value is not None
    ]
    factors["start_token_auc"] = max(aucs) if aucs else None
    return {
        key: (None if value is None or not np.isfinite(value) else float(value))
        for key, value in factors.items()
    }


@dataclass(repr=False)
class MethodComparison(Displayed):
    """The measurements of a comparison: ``methods`` maps each method's name to :func:`measure_method`'s
    dict (``"vanilla"`` among them for the repair map), ``baseline`` is :func:`measure_baseline`'s,
    ``reference`` :func:`measure_reference`'s (at ``within_length``), ``speed`` the rows of
    :meth:`DecodeSpeedResult.to_dataframe` at ``length`` (or None), ``tasks`` the rows of
    :meth:`TaskResult.to_dataframe` of every method and the baseline (or None)."""

    methods: dict[str, dict[str, Any]]
    baseline: dict[str, Any]
    reference: dict[str, Any]
    train_length: int
    length: int
    within_length: int
    passkey_lengths: list[int]
    speed: pd.DataFrame | None = field(default=None, repr=False)
    tasks: pd.DataFrame | None = field(default=None, repr=False)

    def headline(self) -> dict[str, Any]:
        return {"methods": len(self.methods), "train_length": self.train_length, "length": self.length}

    def display_rows(self) -> dict[str, dict[str, Any]]:
        table = self.table().set_index("method")
        keep = [c for c in table.columns if c.startswith("ppl ") or c.startswith("passkey")]
        return table[keep].to_dict("index")

    def buckets(self) -> dict[str, list[dict[str, Any]]]:
        """Per method (the baseline as :data:`TRUNCATED_BASELINE`) the perplexity buckets."""
        return {name: m["buckets"] for name, m in self.methods.items()} | {
            TRUNCATED_BASELINE: self.baseline["buckets"]
        }

    def perplexity_frame(self) -> pd.DataFrame:
        """method, start, end, nll, n_tokens: what :func:`oodlens.plotting.plot_perplexity_by_position`
        reads."""
        rows = [{"method": name, **b} for name, buckets in self.buckets().items() for b in buckets]
        frame = pd.DataFrame(rows)
        frame["nll"] = frame["nll"].astype(float)
        return frame

    def spans(self) -> list[tuple[int, int]]:
        """The perplexity spans of the table: within L, [L, 2L) and [2L, length) where they exist."""
        train = self.train_length
        return [(0, train)] + [(s, e) for s, e in ((train, 2 * train), (2 * train, self.length)) if e > s]

    def span_ppl(self, method: str, start: int, end: int) -> float:
        """Perplexity of ``method`` over the buckets inside ``[start, end)``, token-weighted (inf where one
        overflowed, NaN where none lies inside)."""
        inside = [b for b in self.buckets()[method] if b["start"] >= start and b["end"] <= end]
        tokens = sum(b["n_tokens"] for b in inside)
        if not tokens:
            return float("nan")
        if any(b["nll"] is None for b in inside):
            return float("inf")
        return float(np.exp(sum(b["nll"] * b["n_tokens"] for b in inside) / tokens))

    def passkey(self, method: str) -> dict[int, Estimate]:
        """Passkey accuracy of ``method`` per prompt length, with its Wilson interval."""
        counts = (self.baseline if method == TRUNCATED_BASELINE else self.methods[method])["passkey"]
        return {int(length): Estimate.proportion(*pair) for length, pair in counts.items()}

    def table(self) -> pd.DataFrame:
        """One row per method and the baseline: perplexity within L and its ratio to the baseline beyond,
        passkey ``correct/n [Wilson interval]`` per length, the mean task score per task length over every
        task's prompts (with its interval), the factors beyond L, prefill seconds, decode ms per token and
        cache MiB at ``length``."""
        decode = self.speed.set_index("method") if self.speed is not None else pd.DataFrame()
        (within, *beyond) = self.spans()
        rows = []
        for name in [*self.methods, TRUNCATED_BASELINE]:
            row: dict[str, Any] = {"method": name, f"ppl <{within[1]}": self.span_ppl(name, *within)}
            for start, end in beyond:
                reference = self.span_ppl(TRUNCATED_BASELINE, start, end)
                row[f"ppl {start}-{end} / baseline"] = self.span_ppl(name, start, end) / reference
            for length, estimate in self.passkey(name).items():
                row[f"passkey @{length}"] = estimate_text(estimate.to_dict(), count=True)
            if self.tasks is not None:
                for length, rows_at in self.tasks[self.tasks["method"] == name].groupby("length"):
                    row[f"tasks @{length}"] = estimate_text(Estimate.score_mean(rows_at["score"]).to_dict())
            factors = self.methods.get(name, {}).get("factors", {})
            row["max logit >L"] = factors.get("max_logit_beyond")
            row["entropy >L"] = factors.get("entropy_beyond")
            row["sink mass >L"] = factors.get("sink_mass_beyond")
            row["start-token AUC"] = factors.get("start_token_auc")
            row[f"prefill s @{self.length}"] = self.methods.get(name, {}).get("forward_s")
            for column, label in (("ms_per_token", "decode ms/token"), ("cache_mib", "cache MiB")):
                value = decode[column].get(name) if column in decode else None
                row[f"{label} @{self.length}"] = value
            rows.append(row)
        return pd.DataFrame(rows)

    def task_result(self) -> TaskResult:
        """The task rows of every method and the baseline as one :class:`TaskResult` (empty without tasks):
        its ``accuracy()`` is the per (method, task, length) table, its ``metric_frame()`` the figure's."""
        return TaskResult(rows=[] if self.tasks is None else self.tasks.to_dict("records"))

    def repairs(self) -> pd.DataFrame:
        """The repair map's cells, one row per (method, quantity): ``ratio`` of the method's value beyond L to
        vanilla's within L (the largest logit, the late entropy, the sink mass), of its perplexity over the
        last span to the baseline's, and of its passkey accuracy to vanilla's within L; ``label`` the
        passkey's ``correct/n``."""
        if "vanilla" not in self.methods:
            raise OodlensError("the repair map needs vanilla among the methods: add 'vanilla'")
        within = self.methods["vanilla"]["factors"]
        within_passkey = Estimate.proportion(*self.reference[str(self.within_length)])
        last = self.spans()[-1]
        rows = []
        for name, result in self.methods.items():
            factors = result["factors"]
            correct = sum(pair[0] for pair in result["passkey"].values())
            n = sum(pair[1] for pair in result["passkey"].values())
            cells = {
                REPAIRS[0]: _ratio(factors["max_logit_beyond"], within["max_logit_within"]),
                REPAIRS[1]: _ratio(factors["entropy_beyond"], within["entropy_late_within"]),
                REPAIRS[2]: _ratio(factors["sink_mass_beyond"], within["sink_mass_within"]),
                REPAIRS[3]: self.span_ppl(name, *last) / self.span_ppl(TRUNCATED_BASELINE, *last),
                REPAIRS[4]: _ratio(correct / n if n else None, within_passkey.value),
            }
            for quantity, ratio in cells.items():
                label = f"{correct}/{n}" if quantity == REPAIRS[4] else None
                rows.append({"method": name, "quantity": quantity, "ratio": ratio, "label": label})
        return pd.DataFrame(rows)


def compare_methods(
    model: PreTrainedModel,
    tokenizer: Any,
    windows: torch.LongTensor,
    policies: Sequence[Policy],
    *,
    train_length: int | None = None,
    capture_length: int | None = None,
    passkey_lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    within_length: int | None = None,
    bucket: int | None = None,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    tasks: Sequence[str] = (),
    task_lengths: Sequence[int] | None = None,
    task_samples: int = 4,
    progress: bool = True,
) -> MethodComparison:
    """Measure every policy side by side on ``windows [n, length]`` (vanilla first if missing, as the repair
    map's reference), with the truncated baseline.

    Defaults: ``capture_length`` min(2 L, length), ``passkey_lengths`` 1.5 L and 2 L, vanilla's passkey
    reference at ``within_length`` L / 2, ``bucket`` L / 8; decoding after ``length`` tokens of context
    (``decode_steps=0`` skips it); ``tasks`` (names of :data:`oodlens.tasks.TASKS`) with ``task_samples``
    prompts each at ``task_lengths`` (default 1.5 L). RoPE rescaling should be stretched to ``length`` by its
    caller (``policy_by_name("yarn", target_length=length)``).
    """
    train = train_length_of(model, train_length)
    length = windows.shape[-1]
    named = {policy.name: policy for policy in policies}
    if len(named) != len(policies):
        raise OodlensError("two policies share a name: give each method once")
    named = {"vanilla": vanilla()} | named
    passkey_lengths = list(passkey_lengths or (3 * train // 2, 2 * train))
    within_length = within_length or train // 2
    bucket = bucket or max(train // 8, 1)
    common = {"train_length": train, "passkey_lengths": passkey_lengths, "depths": depths, "bucket": bucket}
    measured = {
        name: measure_method(
            model,
            tokenizer,
            windows,
            policy,
            capture_length=capture_length or min(2 * train, length),
            progress=progress,
            **common,
        )
        for name, policy in named.items()
    }
    baseline = measure_baseline(model, tokenizer, windows, progress=progress, **common)
    reference = measure_reference(model, tokenizer, train_length=train, length=within_length, depths=depths)
    speed = None
    if decode_steps:
        speed = decode_speed(
            model, list(named.values()), [length], steps=decode_steps, progress=progress
        ).to_dataframe()
    task_rows = None
    if tasks:
        task_rows = task_accuracy(
            model,
            tokenizer,
            list(named.values()),
            tasks,
            lengths=list(task_lengths or [3 * train // 2]),
            n_samples=task_samples,
            train_length=train,
            progress=progress,
        ).to_dataframe()
    return MethodComparison(
        measured, baseline, reference, train, length, within_length, passkey_lengths, speed, task_rows
    )


def _passkey(
    model: PreTrainedModel,
    tokenizer: Any,
    policies: Sequence[Policy],
    lengths: Sequence[int],
    depths: Sequence[float],
    train_length: int,
    *,
    truncated: bool,
) -> dict[str, dict[str, list[int]]]:
    """``{method: {length: [correct, n]}}`` (string lengths, as JSON keeps them)."""
    result = passkey_retrieval(
        model,
        tokenizer,
        policies,
        lengths=lengths,
        depths=depths,
        train_length=train_length,
        truncated_baseline=truncated,
        progress=False,
    )
    counts: dict[str, dict[str, list[int]]] = {}
    for row in result.accuracy().itertuples():
        counts.setdefault(row.method, {})[str(row.length)] = [int(row.correct), int(row.n)]
    return counts


def _buckets(ppl: PerplexityResult) -> list[dict[str, Any]]:
    """Per position bucket: start, end, mean NLL (None where not finite) and tokens."""
    frame = ppl.to_dataframe()[["start", "end", "nll", "n_tokens"]]
    return [
        {**record, "nll": None if not np.isfinite(record["nll"]) else record["nll"]}
        for record in frame.to_dict("records")
    ]


def _ratio(value: float | None, reference: float | None) -> float:
    if value is None or reference is None or not reference:
        return float("nan")
    return float(value) / float(reference)
