"""Perplexity by position (the paper's Fig. 3), every method on the same windows, with the content-matched
truncated baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from ..display import Displayed, format_number, short_repr
from ..errors import OodlensError
from ..models import train_length_of
from ..policies import Policy, apply_policy
from ..stats import Estimate
from .prefix import SharedPrefix, continued_nll, continues_prefix, shared_length
from .scoring import (
    DEFAULT_CHUNK,
    bucket_ranges,
    finite_or_none,
    inference,
    methods_of,
    perplexity_of,
    progress_bar,
    token_nll,
    truncated_nll,
)

DEFAULT_BUCKET = 1024


@dataclass(repr=False)
class PerplexityResult(Displayed):
    """Per-position NLL of each method, averaged over windows, and per window where it was given.

    Attributes:
        token_nll: method → ``[length]`` float32 array, mean NLL over windows of the token at each position
            (NaN at position 0, which nothing predicts). Given ``[n_windows, length]`` (one row per window),
            the rows are kept in ``window_nll`` and averaged here.
        train_length, length, n_windows, bucket: the run's settings.
        window_nll: method → ``[n_windows, length]``, what the intervals resample (windows are independent
            samples; the tokens of one window are not).

    ``to_dataframe()`` rows: ``{method, start, end, nll, ppl, ppl_low, ppl_high, n_tokens, n_windows}`` per
    bucket ``[start, end)`` of positions; ``nll`` is the mean NLL over the bucket's scored tokens,
    ``ppl = exp(nll)``, ``ppl_low``/``ppl_high`` its 95 % bootstrap interval over windows (NaN with fewer
    than 2 windows or without ``window_nll``), ``n_tokens`` the number of scored tokens (positions × windows).
    """

    token_nll: dict[str, np.ndarray]
    train_length: int
    length: int
    n_windows: int
    bucket: int
    window_nll: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        averaged = {}
        for method, nll in self.token_nll.items():
            nll = np.asarray(nll, dtype=np.float32)
            if nll.ndim == 2:
                if nll.shape[0] != self.n_windows:
                    raise OodlensError(
                        f"{method}: {nll.shape[0]} rows of window NLL for {self.n_windows} windows"
                    )
                self.window_nll[method] = nll
                nll = nll.mean(axis=0)
            averaged[method] = nll
        self.token_nll = averaged

    def headline(self) -> dict[str, Any]:
        return {"windows": f"{self.n_windows} × {self.length} tokens", "train_length": self.train_length}

    def display_rows(self) -> dict[str, dict[str, Any]]:
        return {
            method: {
                "ppl within L": block["ppl_within_train_length"],
                "ppl beyond L": block["ppl_beyond_train_length"],
            }
            for method, block in self.summary()["methods"].items()
        }

    def __repr__(self) -> str:
        methods = ", ".join(
            f"{name} {format_number(row['ppl beyond L'])}" for name, row in self.display_rows().items()
        )
        return short_repr("PerplexityResult", self.headline()) + f" ppl beyond L: {methods}"

    def mean_nll(self, method: str, start: int = 1, end: int | None = None) -> float:
        """Mean NLL of ``method`` over positions ``[start, end)`` (NaN when the range scores nothing)."""
        values = self.token_nll[method][max(start, 1) : self.length if end is None else end]
        return float(np.mean(values)) if values.size else math.nan

    def ppl(self, method: str, start: int = 1, end: int | None = None) -> float:
        """Perplexity of ``method`` over positions ``[start, end)``."""
        return perplexity_of(self.mean_nll(method, start, end))

    def estimate(self, method: str, start: int = 1, end: int | None = None) -> Estimate:
        """Perplexity of ``method`` over positions ``[start, end)`` with its 95 % bootstrap interval over
        windows (NaN ends with fewer than 2 windows or when only the average was given)."""
        start, end = max(start, 1), self.length if end is None else end
        windows = self.window_nll.get(method)
        if windows is None or end <= start:
            ppl = self.ppl(method, start, end)
            return Estimate(ppl, math.nan, math.nan, self.n_windows, "bootstrap-windows")
        interval = Estimate.perplexity(windows[:, start:end].astype(np.float64).mean(axis=1))
        # the value is the one ppl() gives everywhere else; the interval comes from resampled windows
        return replace(interval, value=self.ppl(method, start, end))

    def ratio(self, method: str, reference: str, start: int = 1, end: int | None = None) -> Estimate:
        """``method``'s perplexity over ``reference``'s on the same positions ``[start, end)``, with a paired
        95 % bootstrap interval over windows: each window's mean NLL difference is resampled as one, so the
        content's own variation, shared by both, cancels (NaN ends with fewer than 2 windows)."""
        start, end = max(start, 1), self.length if end is None else end
        value = self.ppl(method, start, end) / self.ppl(reference, start, end)
        if method not in self.window_nll or reference not in self.window_nll or end <= start:
            return Estimate(value, math.nan, math.nan, self.n_windows, "paired-bootstrap-windows")
        first, second = (
            self.window_nll[name][:, start:end].mean(axis=1, dtype=np.float64) for name in (method, reference)
        )
        interval = Estimate.perplexity(first - second)
        return replace(interval, value=value, method="paired-bootstrap-windows")

    def to_dataframe(self) -> pd.DataFrame:
        rows = []
        for method in self.token_nll:
            for start, end in bucket_ranges(self.length, self.bucket):
                scored = end - max(start, 1)
                if scored > 0:
                    estimate = self.estimate(method, start, end)
                    nll = self.mean_nll(method, start, end)
                    rows.append(
                        dict(
                            method=method,
                            start=start,
                            end=end,
                            nll=nll,
                            ppl=perplexity_of(nll),
                            ppl_low=estimate.low,
                            ppl_high=estimate.high,
                            n_tokens=scored * self.n_windows,
                            n_windows=self.n_windows,
                        )
                    )
        columns = ["method", "start", "end", "nll", "ppl", "ppl_low", "ppl_high", "n_tokens", "n_windows"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> dict[str, Any]:
        """``{train_length, length, n_windows, bucket, methods: {method: {buckets: [{start, end, ppl, ppl_low,
        ppl_high}], ppl_within_train_length, ppl_beyond_train_length, intervals: {ppl_within_train_length,
        ppl_beyond_train_length}}}}``, each interval an :meth:`Estimate.to_dict` (value, low, high, n
        windows); non-finite numbers are ``None``."""
        table = self.to_dataframe()
        methods = {}
        for method, rows in table.groupby("method", sort=False):
            within_end = min(self.train_length, self.length)
            within = self.estimate(method, 1, within_end)
            beyond = self.estimate(method, self.train_length, self.length)
            methods[method] = {
                "buckets": [
                    {
                        "start": int(row.start),
                        "end": int(row.end),
                        "ppl": finite_or_none(row.ppl),
                        "ppl_low": finite_or_none(row.ppl_low),
                        "ppl_high": finite_or_none(row.ppl_high),
                    }
                    for row in rows.itertuples()
                ],
                "ppl_within_train_length": finite_or_none(self.ppl(method, 1, within_end)),
                "ppl_beyond_train_length": finite_or_none(self.ppl(method, self.train_length, self.length)),
                "intervals": {
                    "ppl_within_train_length": within.to_dict(),
                    "ppl_beyond_train_length": beyond.to_dict(),
                },
            }
        return {
            "train_length": self.train_length,
            "length": self.length,
            "n_windows": self.n_windows,
            "bucket": self.bucket,
            "methods": methods,
        }


def perplexity_by_position(
    model: PreTrainedModel,
    windows: torch.LongTensor,
    policies: Sequence[Policy],
    *,
    train_length: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    chunk: int = DEFAULT_CHUNK,
    truncated_baseline: bool = True,
    share_prefix: bool = True,
    progress: bool = True,
) -> PerplexityResult:
    """NLL of every position of ``windows [n, length]`` under each policy, one forward per window and method.

    ``truncated_baseline`` adds :data:`TRUNCATED_BASELINE`: vanilla with at most ``train_length`` tokens of
    context (see :func:`truncated_sequence_nll`), which scores the same tokens without ever leaving the
    training distribution, so it separates "the fix works" from "later text is harder".

    ``share_prefix``: every method attends as vanilla does below its window (for the usual methods, the
    first ``train_length`` tokens), so with several methods that part of each window runs once,
    under vanilla, and each method continues from a copy of its key/value cache (the baseline reuses it as its
    first piece); methods that attend otherwise from an earlier token (rescaled RoPE, Self-Extend's groups)
    run alone, and the prefix's length is the one that saves the most (:func:`~.prefix.shared_length`). The
    scores are those of one forward per method up to float rounding; the cost is the cache
    of the shared tokens and of each method's continuation. ``False`` runs every method from the first token
    without a cache.
    """
    train_length = train_length_of(model, train_length)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise OodlensError(
            f"windows must be [n, length] token ids with length ≥ 2, got shape {tuple(windows.shape)}"
        )
    if bucket < 1 or chunk < 1:
        raise OodlensError(f"bucket and chunk must be positive, got {bucket} and {chunk}")
    methods = methods_of(policies, truncated_baseline)
    shared = shared_length(methods, train_length, windows.shape[1] - 1) if share_prefix else 0
    per_window: dict[str, list[torch.Tensor]] = {method.name: [] for method in methods}
    with inference(model), progress_bar(len(methods) * len(windows), progress, "window", "perplexity") as bar:
        for ids in windows:
            prefix = SharedPrefix(model, train_length)
            prefix_nll = torch.full((ids.shape[0],), math.nan)
            if shared:
                hidden = prefix.extend(ids, shared)
                targets = ids[1 : shared + 1].to(hidden.device)
                prefix_nll[1 : shared + 1] = token_nll(model, hidden, targets, chunk).cpu()
            for method in methods:
                with apply_policy(model, method.policy, train_length=train_length) as handle:
                    if method.truncated:
                        nll = truncated_nll(model, ids, train_length, chunk, prefix_nll)
                    else:
                        own = prefix if continues_prefix(method, train_length, shared) else None
                        nll = continued_nll(model, handle, ids, own, prefix_nll, chunk)
                    per_window[method.name].append(nll)
                bar.update()
    window_nll = {name: torch.stack(rows).numpy() for name, rows in per_window.items()}
    return PerplexityResult(window_nll, train_length, windows.shape[1], len(windows), bucket)
