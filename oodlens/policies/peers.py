"""The training-free peers of LM-Infinite, each the rule of its own public code (docs/methods.md cites the
file and function of every one), with its authors' defaults as a function of the pretraining length L.

================  =====================================================  ==============================
method            positions (i query, j key; beyond the near band)        logit factor
================  =====================================================  ==============================
streaming-llm     first S and last R keys; query at min(i, S + R − 1)     —
self-extend       every key; ⌊i/G⌋ + W − W/G and ⌊j/G⌋                   optional max(1, ln(i+1)/ln b)
rerope            every key; query at w, key at 0                         max(1, ln(i+1)/ln L)
leaky-rerope      every key; (i + w(k − 1))/k and j/k                     max(1, ln(i+1)/ln L)
string            every key; query at i − S + W                           (1 + 0.1 ln 2)² on every pair
dual-chunk        chunks of s − w; own, previous and older chunks         (0.05 ln(n/L) + 1)² past L
================  =====================================================  =============================="""

from __future__ import annotations

import math
from typing import Any

from ..attention import ChunkPlan, PositionMap, QueryScale
from ..errors import OodlensError, check_count
from .base import EVERY_KEY, RESOLVERS, Policy, or_length, settings_of, tokens

STRING_ATTENTION_FACTOR = 1 + 0.1 * math.log(2)  # STRING scales cos and sin by it, so logits by its square


def streaming_llm(n_sink: int = 4, window: int | None = None) -> Policy:
    """StreamingLLM (Xiao et al., 2024; mit-han-lab/streaming-llm ``pos_shift``): query i sees key j iff
    ``j < n_sink`` or ``i − j < window`` (``window`` counts the query itself, so attention_sinks'
    ``attention_sink_window_size`` is ``window − 1``). Recent keys sit at their true distance; positions are
    re-assigned by cache index, so sink j is seen at ``min(i, n_sink + window − 1) − j`` (its true distance
    until the cache is full). Default window: ``L − n_sink``, so that the cache holds the pretraining length.
    Decodes token by token in constant memory with the bounded cache."""
    return Policy("streaming-llm", "streaming-llm", settings_of(n_sink=n_sink, window=window))


def _streaming_llm(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    n_sink = check_count("n_sink", settings["n_sink"], minimum=0)
    window = tokens("window", or_length(settings["window"], train_length - n_sink), upto=train_length)
    if n_sink + window > train_length:
        raise OodlensError(
            f"n_sink + window = {n_sink + window} exceeds the pretraining length {train_length}: "
            f"the cache would hold positions the model never saw; use window ≤ {train_length - n_sink}"
        )
    return {"window": window, "n_global": n_sink, "far_query": PositionMap(cap=n_sink + window - 1)}


def self_extend(
    group_size: int = 8, window: int | None = None, log_scale_base: float | None = None
) -> Policy:
    """Self-Extend (Jin et al., 2024; datamllab/LongLM ``self_extend_patch/Llama.py``): every key; within the
    neighbour ``window`` W (``group_size_2``) true distances, beyond it the query at ``⌊i/G⌋ + W − W/G`` and
    the key at ``⌊j/G⌋`` (fractional when G does not divide W, as the torch path of ``Llama.py``). Defaults: G
    = 8 (the code's), W = L/4 (the README's range for Llama-2, and the code's 1,024 at L = 4,096). Optional
    query scale ``max(1, ln(i + 1) / ln(log_scale_base))``, off by default as in the code (its docstring
    suggests L as the base). Reach: inputs up to about ``(L − W)·G + W`` keep every position within L."""
    settings = settings_of(group_size=group_size, window=window, log_scale_base=log_scale_base)
    return Policy("self-extend", "self-extend", settings)


def _self_extend(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    group = check_count("group_size", settings["group_size"], minimum=1)
    window = tokens("window", or_length(settings["window"], train_length // 4), upto=train_length)
    far_query = PositionMap(group=group, offset=window - window / group)
    fields = {
        "window": window,
        "n_global": EVERY_KEY,
        "far_query": far_query,
        "far_key": PositionMap(group=group),
    }
    return fields | _log_scale(settings["log_scale_base"])


def rerope(window: int | None = None, *, log_scale: bool = True) -> Policy:
    """ReRoPE (Su, 2023; bojone/rerope ``rerope_patch.py``): every key, distances ``min(i − j, window)``
    (far keys unrotated, the query at ``window``), and the code's log-n query scale
    ``max(1, ln(i + 1) / ln L)`` (``log_scale=False`` leaves it out: that is LM-Infinite's distance limit).
    Default window: L/8, as in the code (its reported results use L/4)."""
    return Policy("rerope", "rerope", settings_of(window=window, leak=None, log_scale=log_scale))


def leaky_rerope(window: int | None = None, leak: float = 16.0, *, log_scale: bool = True) -> Policy:
    """Leaky ReRoPE (Su, 2023; bojone/rerope ``leaky_rerope_patch.py``): beyond ``window`` the distance grows
    ``leak`` times slower, ``window + (i − j − window) / leak`` (query at ``(i + window·(leak − 1)) / leak``,
    key at ``j / leak``), with the same log-n query scale. Defaults as in the code: window L/8, leak 16."""
    return Policy("leaky-rerope", "rerope", settings_of(window=window, leak=leak, log_scale=log_scale))


def _rerope(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    window = tokens("window", or_length(settings["window"], train_length // 8), upto=train_length)
    scale = _log_scale(train_length if settings["log_scale"] else None)
    leak = settings["leak"]
    if leak is None:
        return {"window": window, "n_global": EVERY_KEY, "distance_limit": window} | scale
    if isinstance(leak, bool) or not isinstance(leak, (int, float)) or leak <= 1:
        raise OodlensError(
            f"leak must be a number > 1 (the distance beyond the window grows 1/leak as fast), got {leak!r}"
        )
    far_query = PositionMap(scale=1 / leak, offset=window * (1 - 1 / leak))
    return {
        "window": window,
        "n_global": EVERY_KEY,
        "far_query": far_query,
        "far_key": PositionMap(scale=1 / leak),
    } | scale


def string(
    shifted_offset: int | None = None,
    small_local_value: int | None = None,
    attention_factor: float = STRING_ATTENTION_FACTOR,
) -> Policy:
    """STRING (An et al., 2025; HKUNLP/STRING ``string_for_llama.py``): every key; the ``shifted_offset`` S
    most recent keys at their true distance, the rest shifted to ``i − j − S + small_local_value`` (the query
    at ``i − S + W``), so the largest, rarely trained distances are dropped. Every logit is multiplied by
    ``attention_factor²`` (the code scales cos and sin by ``1 + 0.1 ln 2``). Defaults as in the README: S =
    0.33 L, W = 128 (at most S / 2, for small models). Meant for inputs within L; its largest distance is
    ``n − 1 − S + W``."""
    settings = settings_of(
        shifted_offset=shifted_offset, small_local_value=small_local_value, attention_factor=attention_factor
    )
    return Policy("string", "string", settings)


def _string(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    shift = tokens(
        "shifted_offset", or_length(settings["shifted_offset"], int(0.33 * train_length)), upto=train_length
    )
    local = or_length(settings["small_local_value"], max(1, min(128, shift // 2)))
    local = tokens("small_local_value", local, upto=shift, what="shifted_offset")
    factor = settings["attention_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise OodlensError(f"attention_factor must be a positive number, got {factor!r}")
    far_query = PositionMap(offset=local - shift)
    scale = QueryScale(constant=float(factor) ** 2)
    return {"window": shift, "n_global": EVERY_KEY, "far_query": far_query, "query_scale": scale}


def dual_chunk(
    chunk_size: int | None = None, local_window: int | None = None, *, scale_logits: bool = True
) -> Policy:
    """Dual chunk attention (An et al., 2024; HKUNLP/ChunkLlama ``chunkllama_attn_replace.py``): keys sit at
    ``j mod c`` with chunks of ``c = chunk_size − local_window``; a query sees its own chunk at true
    distances, the previous chunk from ``min(i mod c + c, chunk_size)`` and older chunks from
    ``min(2c − 1, chunk_size)``, so no distance exceeds ``chunk_size``. Past L, logits are multiplied by
    ``(0.05 ln(n / L) + 1)²`` for a call over n tokens (``scale_logits=False`` leaves it out). Defaults as
    ``replace_with_chunkllama``: chunk_size ⌊3L/4⌋, local_window ⌊L/8⌋."""
    settings = settings_of(chunk_size=chunk_size, local_window=local_window, scale_logits=scale_logits)
    return Policy("dual-chunk", "dual-chunk", settings)


def _dual_chunk(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    size = tokens("chunk_size", or_length(settings["chunk_size"], 3 * train_length // 4), upto=train_length)
    local = tokens("local_window", or_length(settings["local_window"], train_length // 8))
    if local >= size:
        raise OodlensError(
            f"local_window {local} must be smaller than chunk_size {size} (chunks are their difference)"
        )
    scale = (
        QueryScale(length_coefficient=0.05, train_length=train_length) if settings["scale_logits"] else None
    )
    return {"chunk": ChunkPlan(chunk=size - local, cap=size), "query_scale": scale}


def _log_scale(base: float | None) -> dict[str, Any]:
    """ReRoPE's and Self-Extend's ``max(1, ln(i + 1) / ln base)`` on each query's logits, or nothing."""
    if base is None:
        return {}
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 1:
        raise OodlensError(f"log_scale_base must be a number > 1 (e.g. the pretraining length), got {base!r}")
    return {"query_scale": QueryScale(log_base=float(base))}


RESOLVERS |= {
    "streaming-llm": _streaming_llm,
    "self-extend": _self_extend,
    "rerope": _rerope,
    "string": _string,
    "dual-chunk": _dual_chunk,
}
