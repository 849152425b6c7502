"""Streaming perplexity: a token stream of any length fed chunk by chunk through a policy's bounded cache, in
constant memory."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..display import Displayed
from ..errors import OodlensError
from ..memory import device_peak_gib, reset_device_peak
from ..models import train_length_of
from ..policies import Policy, PolicyHandle, apply_policy
from ..stats import Estimate
from .scoring import (
    cache_kwargs,
    finite_or_none,
    forward_hidden,
    inference,
    new_cache,
    output_logits,
    perplexity_of,
    progress_bar,
    token_nll,
)

DEFAULT_STREAM_BUCKET = 4096


def cycle_tokens(token_ids: torch.LongTensor, n: int, piece: int = 65_536) -> Iterator[torch.LongTensor]:
    """A stream of ``n`` tokens that repeats ``token_ids [N]`` end to end, as pieces of ``≤ piece`` tokens.

    Lazy, so a stream of any length costs no memory: pass it to :func:`streaming_perplexity` to go past the
    corpus's size (the embedded corpus holds about 113k SmolLM2 tokens). Repeated text is easier the second
    time only for a model that can still see the first copy, which a window shorter than the corpus cannot.
    """
    token_ids = token_ids.reshape(-1)
    if token_ids.numel() == 0 or n < 0 or piece < 1:
        raise OodlensError("cycle_tokens needs a non-empty token sequence, n ≥ 0 and piece ≥ 1")
    produced = 0
    while produced < n:
        offset = produced % token_ids.numel()
        take = min(piece, token_ids.numel() - offset, n - produced)
        yield token_ids[offset : offset + take]
        produced += take


def _rechunk(
    stream: torch.LongTensor | Iterable[torch.LongTensor], chunk: int, max_tokens: int | None
) -> Iterator[torch.LongTensor]:
    """Pieces of exactly ``chunk`` tokens (the last may be shorter), at most ``max_tokens`` in all."""
    pieces = [stream] if isinstance(stream, torch.Tensor) else stream
    buffer = torch.empty(0, dtype=torch.long)
    received = 0
    for piece in pieces:
        piece = piece.reshape(-1)
        if max_tokens is not None:
            piece = piece[: max_tokens - received]
        received += piece.numel()
        buffer = torch.cat([buffer, piece])
        while buffer.numel() >= chunk:
            yield buffer[:chunk]
            buffer = buffer[chunk:]
        if max_tokens is not None and received >= max_tokens:
            break  # before pulling another piece: the stream may be endless
    if buffer.numel():
        yield buffer


@dataclass(repr=False)
class StreamingResult(Displayed):
    """Bucketed NLL of a token stream run through a cache chunk by chunk.

    Attributes:
        method: the policy's name.
        bucket: bucket width in stream positions.
        nll_sum, n_scored: ``[n_buckets]`` float64 / int64, summed NLL and scored tokens per bucket.
        n_tokens: tokens consumed; seconds: wall time; peak_cache_tokens: most keys held by any cache layer
            after a chunk (constant once the window is full, for a bounded cache).
        peak_memory_gib: ``[n_buckets]`` float64, the peak memory while the bucket's chunks ran: CUDA's
            allocator peak on a GPU, this process's resident set on a CPU (NaN where it cannot be read).
        bucket_seconds: ``[n_buckets]`` float64, wall time of the chunks that ended in the bucket.

    ``to_dataframe()`` rows: ``{start, end, nll, ppl, n_tokens, peak_memory_gib, seconds}`` per bucket.
    """

    method: str
    bucket: int
    nll_sum: np.ndarray
    n_scored: np.ndarray
    n_tokens: int
    seconds: float
    peak_cache_tokens: int
    peak_memory_gib: np.ndarray
    bucket_seconds: np.ndarray

    def headline(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tokens": self.n_tokens,
            "ppl": self.ppl(),
            "tokens_per_s": self.tokens_per_s,
            "peak_cache_tokens": self.peak_cache_tokens,
        }

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else math.nan

    def ppl(self) -> float:
        """Perplexity over the whole stream."""
        return perplexity_of(self.nll_sum.sum() / self.n_scored.sum()) if self.n_scored.sum() else math.nan

    def estimate(self) -> Estimate:
        """The stream's perplexity with a block-bootstrap interval: its buckets (contiguous ``bucket``
        tokens) resampled whole and weighed by their tokens, as windows are
        (:func:`~oodlens.stats.perplexity_interval`). Buckets of one stream are treated as exchangeable,
        so the interval measures how much the stream's parts differ, not how another text would score."""
        scored = self.n_scored > 0
        means = self.nll_sum[scored] / self.n_scored[scored]
        estimate = Estimate.perplexity(means, self.n_scored[scored])
        return replace(estimate, method="bootstrap-buckets")

    def to_dataframe(self) -> pd.DataFrame:
        rows = []
        buckets = zip(self.nll_sum, self.n_scored, self.peak_memory_gib, self.bucket_seconds, strict=True)
        for index, (total, count, memory, seconds) in enumerate(buckets):
            if count:
                start = index * self.bucket
                nll = float(total / count)
                rows.append(
                    dict(
                        start=start,
                        end=min(start + self.bucket, self.n_tokens),
                        nll=nll,
                        ppl=perplexity_of(nll),
                        n_tokens=int(count),
                        peak_memory_gib=float(memory),
                        seconds=float(seconds),
                    )
                )
        columns = ["start", "end", "nll", "ppl", "n_tokens", "peak_memory_gib", "seconds"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> dict[str, Any]:
        """``{method, n_tokens, bucket, ppl, intervals: {ppl: ESTIMATE}, tokens_per_s, peak_cache_tokens,
        buckets: [{start, end, ppl, peak_memory_gib}]}`` (the interval from :meth:`estimate`); non-finite
        numbers are ``None``."""
        buckets = [
            {
                "start": int(row.start),
                "end": int(row.end),
                "ppl": finite_or_none(row.ppl),
                "peak_memory_gib": finite_or_none(row.peak_memory_gib),
            }
            for row in self.to_dataframe().itertuples()
        ]
        return {
            "method": self.method,
            "n_tokens": self.n_tokens,
            "bucket": self.bucket,
            "ppl": finite_or_none(self.ppl()),
            "intervals": {"ppl": self.estimate().to_dict()},
            "tokens_per_s": finite_or_none(self.tokens_per_s),
            "peak_cache_tokens": self.peak_cache_tokens,
            "buckets": buckets,
        }


class _BucketSums:
    """Running per-bucket columns, grown as the stream goes (a few numbers per bucket): summed NLL
    (``total``), scored tokens (``count``), peak memory (``memory``, NaN until a chunk ends in the bucket) and
    wall time (``seconds``)."""

    EMPTY = {"total": 0.0, "count": 0, "memory": np.nan, "seconds": 0.0}  # a new bucket's value

    def __init__(self, bucket: int):
        self.bucket = bucket
        self.n_buckets = 0
        self._columns = {name: np.full(64, empty) for name, empty in self.EMPTY.items()}
        self._columns["count"] = self._columns["count"].astype(np.int64)

    def add(self, first_position: int, nll: torch.Tensor) -> None:
        """Add the NLL ``[C]`` of positions ``first_position, first_position + 1, ...``."""
        index = (first_position + np.arange(nll.numel())) // self.bucket
        if not index.size:
            return
        self._grow(int(index[-1]) + 1)
        np.add.at(self._columns["total"], index, nll.double().numpy())
        np.add.at(self._columns["count"], index, 1)

    def add_chunk(self, position: int, gib: float, seconds: float) -> None:
        """Count a chunk's peak memory and time towards the bucket of stream position ``position``."""
        index = position // self.bucket
        self._grow(index + 1)
        memory = self._columns["memory"]
        memory[index] = np.fmax(memory[index], gib)
        self._columns["seconds"][index] += seconds

    def _grow(self, n_buckets: int) -> None:
        self.n_buckets = max(self.n_buckets, n_buckets)
        size = self._columns["total"].size
        if self.n_buckets > size:  # doubling keeps a very long stream's growth cheap
            grow = max(self.n_buckets, 2 * size) - size
            for name, column in self._columns.items():
                self._columns[name] = np.concatenate([column, np.full(grow, self.EMPTY[name], column.dtype)])

    def column(self, name: str) -> np.ndarray:
        """One column over the buckets seen so far."""
        return self._columns[name][: self.n_buckets]


def _stream_cache(model: PreTrainedModel, handle: PolicyHandle, max_tokens: int | None) -> Any:
    if not handle.policy.runs_in_pieces(handle.train_length):
        raise OodlensError(
            f"{handle.policy.name}'s result depends on how a sequence is split into calls, so a stream fed "
            "chunk by chunk would not score what one forward scores: use perplexity_by_position"
        )
    plan = handle.policy.cache_plan(handle.train_length)
    if max_tokens is None and not plan.bounded:
        raise OodlensError(
            f"{plan.reason}, so its cache grows with the stream: use a policy with a bounded cache such as "
            "lm_infinite(), or pass max_tokens"
        )
    return new_cache(model, handle)


def _stored_tokens(cache: Any) -> int:
    return max((0 if layer.keys is None else layer.keys.shape[-2]) for layer in cache.layers)


def streaming_perplexity(
    model: PreTrainedModel,
    token_stream: torch.LongTensor | Iterable[torch.LongTensor],
    policy: Policy,
    *,
    train_length: int | None = None,
    chunk: int = 512,
    bucket: int = DEFAULT_STREAM_BUCKET,
    max_tokens: int | None = None,
    progress: bool = True,
) -> StreamingResult:
    """Perplexity of a token stream (``[N]``, or an iterable of 1-D pieces such as :func:`cycle_tokens`) fed
    ``chunk`` tokens at a time through the policy's bounded cache, so memory stays constant however long the
    stream is. Each chunk's first token is scored with the previous chunk's last logits, so every position
    ``≥ 1`` is scored exactly as one forward over the whole stream would score it. The peak memory of every
    bucket is kept beside its perplexity, so a run shows both staying flat (or not); a chunk's memory and time
    count towards the bucket of its last token, so buckets at least ``chunk`` wide each get some.

    Raises:
        OodlensError: the policy keeps every key (vanilla, distance limit alone, top-k) and no
            ``max_tokens`` bounds the run; or its result depends on how a sequence is split into calls
            (DCA, dynamic NTK, LongRoPE).
    """
    train_length = train_length_of(model, train_length)
    if chunk < 1 or bucket < 1 or (max_tokens is not None and max_tokens < 2):
        raise OodlensError(
            f"chunk and bucket must be ≥ 1 and max_tokens ≥ 2, got {chunk}, {bucket}, {max_tokens}"
        )
    device = model.get_output_embeddings().weight.device
    sums = _BucketSums(bucket)
    position, peak, previous_logits = 0, 0, None
    total = (
        max_tokens
        if max_tokens is not None
        else (token_stream.numel() if isinstance(token_stream, torch.Tensor) else None)
    )
    with (
        inference(model),
        apply_policy(model, policy, train_length=train_length) as handle,
        progress_bar(total, progress, "tok", f"stream {policy.name}") as bar,
    ):
        cache = _stream_cache(model, handle, max_tokens)
        started = time.perf_counter()
        for ids in _rechunk(token_stream, chunk, max_tokens):
            was_reset = reset_device_peak(device)
            chunk_started = time.perf_counter()
            ids = ids.to(device)
            hidden = forward_hidden(model, ids[None], use_cache=True, **cache_kwargs(model, cache))[0]
            nll = token_nll(model, hidden[:-1], ids[1:], chunk)
            if previous_logits is not None:
                nll = torch.cat([F.cross_entropy(previous_logits, ids[:1], reduction="none"), nll])
            sums.add(position if previous_logits is not None else 1, nll.cpu())  # position 0 has no score
            previous_logits = output_logits(model, hidden[-1:])
            position += ids.numel()
            seconds_taken = time.perf_counter() - chunk_started
            sums.add_chunk(position - 1, device_peak_gib(device, was_reset), seconds_taken)
            peak = max(peak, _stored_tokens(cache))
            bar.update(ids.numel())
        seconds = time.perf_counter() - started
    return StreamingResult(
        policy.name,
        bucket,
        sums.column("total"),
        sums.column("count"),
        position,
        seconds,
        peak,
        sums.column("memory"),
        sums.column("seconds"),
    )
