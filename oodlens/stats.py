"""Intervals for every number oodlens reports, so that a verdict is worded only as strongly as they allow.

- Proportions (passkey accuracy, share of answers right): :func:`wilson_interval`, which stays inside [0, 1]
  and keeps a width at 0 or n successes, where the normal approximation collapses to a point.
- Means of scores in [0, 1] (RULER's partial string match): :meth:`Estimate.score_mean`, the Wilson interval
  at the mean score, exact for 0/1 scores and conservative otherwise.
- Statistics over samples (windows, prompts): :func:`bootstrap_interval`, a percentile bootstrap.
- Perplexity: :func:`perplexity_interval`, exp of the token-weighted mean NLL, with windows resampled (tokens
  of one window are not independent, windows are).
- :class:`Estimate` carries a number with its interval into summaries, and :func:`describe_difference`
  words the comparison of two.

Why a percentile bootstrap written here rather than ``scipy.stats.bootstrap``: scipy's default (BCa) returns
NaN with a warning when every resample gives the same value (equal windows, a perfect score) and needs a
jackknife pass; perplexity needs a ratio of two resampled sums (NLL·tokens over tokens), which scipy handles
only as a paired multi-sample statistic; and the seeding argument of scipy's bootstrap changed across
versions. A dozen lines of numpy give the same percentile interval, deterministic for a seed on every scipy
version. With the few windows oodlens often evaluates, no bootstrap covers well (with 2 windows the interval
is at most their range); n is reported beside every interval for that reason. An interval needs at least 2
samples: with fewer, its ends are NaN."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import norm

from .errors import OodlensError

# Resamples are drawn in blocks of at most this many numbers, to keep memory small for large samples.
_BLOCK = 2**21


def wilson_interval(
    successes: Any, n: Any, confidence: float = 0.95
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (low, high) for ``successes`` out of ``n``; NaN where ``n`` is 0.

    Vectorised: ``successes`` and ``n`` broadcast against each other, and arrays in give arrays out.

    Raises:
        OodlensError: a count is not a whole number with 0 ≤ successes ≤ n, or confidence is not in (0, 1)."""
    z = _z(confidence)
    k, total = np.broadcast_arrays(np.asarray(successes, dtype=float), np.asarray(n, dtype=float))
    valid = (k >= 0) & (k <= total) & (k == np.floor(k)) & (total == np.floor(total))
    if not valid.all():
        first = np.flatnonzero(~valid)[0]
        raise OodlensError(
            f"wilson_interval needs whole counts with 0 ≤ successes ≤ n, got successes={k.flat[first]:g}, "
            f"n={total.flat[first]:g}: pass counts, not rates"
        )
    return _wilson(k, total, z)


def _wilson(k: np.ndarray, total: np.ndarray, z: float) -> tuple[float, float] | tuple[Any, Any]:
    """Wilson score interval for ``k`` successes (fractional for mean scores) of ``total``, ``z`` wide."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / total
        shrink = 1 + z**2 / total
        centre = (p + z**2 / (2 * total)) / shrink
        half = z * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / shrink
    low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)  # rounding only; NaN stays
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def bootstrap_interval(
    values: Any,
    statistic: Callable[..., Any] = np.mean,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of ``statistic`` over ``values``, one number per sample.

    ``statistic(array, axis=-1)`` must reduce the last axis (``np.mean``, ``np.median`` do), so that all
    resamples of a block are computed at once. The same seed gives the same interval. Fewer than 2 values:
    (NaN, NaN), as one sample says nothing about spread; a NaN among the values gives NaN."""
    sample = _sample(values, "values")
    _check_resamples(n_resamples)
    low_q, high_q = _quantiles(confidence)
    if sample.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    results = [
        np.asarray(statistic(sample[rng.integers(0, sample.size, (size, sample.size))], axis=-1))
        for size in _blocks(n_resamples, sample.size)
    ]
    low, high = np.quantile(np.concatenate(results), [low_q, high_q])
    return float(low), float(high)


def perplexity_interval(
    window_nll_means: Any,
    weights: Any = None,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """Perplexity over windows with its bootstrap interval: ``(ppl, low, high, n_windows)``.

    ``window_nll_means``: each window's mean NLL (nats per token); ``weights``: its number of tokens (default:
    equal). Perplexity is exp of the mean NLL over all tokens, so windows weigh by their tokens. The interval
    resamples whole windows, recomputes that token-weighted mean for each resample, and takes exp of its
    percentiles. Windows with weight 0 hold no tokens and are left out (their mean NLL may be NaN); n_windows
    counts the rest. No tokens: all NaN; one window: its perplexity with NaN ends.

    Raises:
        OodlensError: weights that do not match the windows one to one, or are negative or not finite."""
    nll = _sample(window_nll_means, "window_nll_means")
    tokens = np.ones_like(nll) if weights is None else _sample(weights, "weights")
    if tokens.shape != nll.shape:
        raise OodlensError(
            f"perplexity_interval got {nll.size} windows and {tokens.size} weights: give one per window"
        )
    if not (np.isfinite(tokens).all() and (tokens >= 0).all()):
        raise OodlensError("perplexity_interval weights must be finite token counts ≥ 0: check the weights")
    _check_resamples(n_resamples)
    low_q, high_q = _quantiles(confidence)
    kept = tokens > 0
    nll, tokens = nll[kept], tokens[kept]
    n = int(nll.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    ppl = float(np.exp(np.dot(tokens, nll) / tokens.sum()))
    if n < 2:
        return ppl, math.nan, math.nan, n
    rng = np.random.default_rng(seed)
    means = []
    for size in _blocks(n_resamples, n):
        picks = rng.integers(0, n, (size, n))
        picked = tokens[picks]
        means.append((picked * nll[picks]).sum(axis=-1) / picked.sum(axis=-1))
    low, high = np.exp(np.quantile(np.concatenate(means), [low_q, high_q]))
    return ppl, float(low), float(high), n


@dataclass(frozen=True)
class Estimate:
    """A number with its interval: ``value`` in [``low``, ``high``] at ``confidence``, from ``n`` samples
    (windows, prompts, trials) by ``method``. Ends are NaN where no interval can be given (n < 2)."""

    value: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    @classmethod
    def proportion(cls, successes: int, n: int, confidence: float = 0.95) -> Estimate:
        """``successes`` out of ``n`` with its Wilson interval (value NaN when n is 0)."""
        low, high = wilson_interval(successes, n, confidence)
        return cls(successes / n if n else math.nan, low, high, n, "wilson", confidence)

    @classmethod
    def score_mean(cls, scores: Any, confidence: float = 0.95) -> Estimate:
        """The mean of per-prompt ``scores`` in [0, 1] with the Wilson interval at that mean.

        For 0/1 scores this is the Wilson interval of a proportion (method "wilson"). For partial scores
        (method "wilson-bound") it is conservative: a variable in [0, 1] with mean μ has variance at most
        μ(1 − μ), the variance of a 0/1 score, so the interval is at least as wide as the truth asks. A
        percentile bootstrap over the handful of prompts a CPU run affords is far too narrow instead
        (over four prompts scoring 0.1, 0, 0, 0 it gives [0, 0.075], against [0, 0.49] for four zeros).

        Raises:
            OodlensError: a score is outside [0, 1]."""
        sample = _sample(scores, "scores")
        if ((sample < 0) | (sample > 1)).any():
            raise OodlensError(
                f"score_mean needs scores in [0, 1], got {sample.min():g} to {sample.max():g}: pass each "
                "prompt's score as a fraction of its answers found"
            )
        if not sample.size:
            return cls(math.nan, math.nan, math.nan, 0, "wilson", confidence)
        low, high = _wilson(np.asarray(sample.sum()), np.asarray(float(sample.size)), _z(confidence))
        binary = bool(((sample == 0) | (sample == 1)).all())
        method = "wilson" if binary else "wilson-bound"
        return cls(float(sample.mean()), low, high, int(sample.size), method, confidence)

    @classmethod
    def mean(
        cls, values: Any, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
    ) -> Estimate:
        """The mean of ``values`` (one per sample) with its percentile bootstrap interval."""
        sample = _sample(values, "values")
        low, high = bootstrap_interval(
            sample, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        value = float(sample.mean()) if sample.size else math.nan
        return cls(value, low, high, int(sample.size), "bootstrap", confidence)

    @classmethod
    def perplexity(
        cls,
        window_nll_means: Any,
        weights: Any = None,
        *,
        n_resamples: int = 2000,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> Estimate:
        """Perplexity with its interval from resampled windows (:func:`perplexity_interval`)."""
        ppl, low, high, n = perplexity_interval(
            window_nll_means, weights, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        return cls(ppl, low, high, n, "bootstrap-windows", confidence)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain Python numbers, NaN and infinities as None."""
        return {
            "value": _plain(self.value),
            "low": _plain(self.low),
            "high": _plain(self.high),
            "n": int(self.n),
            "method": self.method,
            "confidence": float(self.confidence),
        }


def describe_difference(a: Estimate, b: Estimate) -> Literal["higher", "lower", "indistinguishable"]:
    """How ``a`` compares with ``b`` as far as their intervals allow: "higher" or "lower" only when the
    intervals do not overlap, else "indistinguishable" (also when either has no interval).

    Non-overlap of two 95 % intervals is a stricter test than a 95 % test of the difference, so a "higher" or
    "lower" here can be stated plainly; "indistinguishable" means only that these samples cannot tell."""
    if a.low > b.high:
        return "higher"
    if a.high < b.low:
        return "lower"
    return "indistinguishable"  # overlapping, or a NaN end (every comparison with NaN is False)


def describe_ratio(ratio: Estimate) -> Literal["higher", "lower", "indistinguishable"]:
    """How a paired ratio (``a`` over ``b`` on the same samples) compares with 1: "higher" or "lower" only
    when its interval excludes 1, else "indistinguishable" (also when it has no interval)."""
    if ratio.low > 1:
        return "higher"
    if ratio.high < 1:
        return "lower"
    return "indistinguishable"  # covering 1, or a NaN end


def _z(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence`` (1.96 for 0.95)."""
    return float(norm.ppf(_quantiles(confidence)[1]))


def _quantiles(confidence: float) -> tuple[float, float]:
    """The lower and upper percentile (as fractions) of a two-sided interval at ``confidence``."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise OodlensError(f"confidence must be a fraction between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return (1 - confidence) / 2, (1 + confidence) / 2


def _check_resamples(n_resamples: int) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise OodlensError(f"n_resamples must be an integer ≥ 1 (e.g. 2000), got {n_resamples!r}")


def _sample(values: Any, label: str) -> np.ndarray:
    """``values`` as a 1-D float array, one number per sample."""
    sample = np.asarray(values, dtype=float)
    if sample.ndim != 1:
        raise OodlensError(f"{label} must be one number per sample (1-D), got shape {sample.shape}")
    return sample


def _blocks(n_resamples: int, n: int) -> list[int]:
    """Sizes of the blocks of resamples of ``n`` values each, ``_BLOCK`` numbers at most per block."""
    per_block = max(1, _BLOCK // n)
    return [min(per_block, n_resamples - start) for start in range(0, n_resamples, per_block)]


def _plain(number: float) -> float | None:
    number = float(number)
    return number if math.isfinite(number) else None
