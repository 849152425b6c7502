"""How much memory a forward needs, and whether a run fits on its device (checked before it starts)."""

from __future__ import annotations

import torch

from ..attention import plain_block
from ..errors import OodlensError
from ..models import ModelInfo
from ..policies import Policy
from .scoring import DEFAULT_CHUNK

# Resident memory besides the weights: Python, torch, transformers (measured, see docs/evaluate.md).
RUNTIME_OVERHEAD_BYTES = 400 * 2**20


def _parameter_count(info: ModelInfo) -> int:
    """Approximate weights: attention projections, a gated MLP of ≈ 8·hidden² per layer, embedding and head
    (counted twice: an over-estimate for models that tie them)."""
    attention = 2 * info.hidden_size * info.head_dim * (info.n_heads + info.n_kv_heads)
    mlp = 8 * info.hidden_size**2
    return info.n_layers * (attention + mlp) + 2 * info.vocab_size * info.hidden_size


def estimate_forward_memory(
    info: ModelInfo,
    length: int,
    batch: int = 1,
    dtype_bytes: int = 4,
    policy: Policy | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> int:
    """Rough peak resident bytes of one forward over ``[batch, length]`` tokens as this module runs it.

    Sum of: runtime overhead; weights; a full key/value cache (kept by generation; a windowed policy's bounded
    cache holds ``n_global + window`` tokens); activations of one layer (residual stream, projections, gated
    MLP, the engine's float32 accumulator); the chunked output head (``chunk × vocab`` float32 logits and
    their softmax); and, for top-k policies, the engine's ``[heads, block, length]`` float32 selection logits.
    Meant to be within about 2× of the truth (see docs/evaluate.md for the calibration); monotone in length.
    """
    for label, value in (("length", length), ("batch", batch), ("chunk", chunk)):
        if not isinstance(value, int) or value < 1:
            raise OodlensError(f"{label} must be a positive integer, got {value!r}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise OodlensError(f"dtype_bytes must be 1, 2, 4 or 8 (bytes per element), got {dtype_bytes!r}")
    resolved = policy.resolve(info.train_length) if policy is not None else None
    kv_tokens = length
    cache = policy.cache_plan(info.train_length) if policy is not None else None
    if cache is not None and cache.bounded:
        kv_tokens = min(length, cache.window + cache.n_global)
    kv_cache = 2 * info.n_layers * info.n_kv_heads * info.head_dim * kv_tokens * batch * dtype_bytes
    projections = 2 * info.n_heads * info.head_dim + 2 * info.n_kv_heads * info.head_dim
    per_token = (11 * info.hidden_size + projections) * dtype_bytes + 4 * info.n_heads * info.head_dim
    activations = batch * length * per_token
    output_head = 2 * batch * min(chunk, length) * info.vocab_size * 4
    top_k = 0
    if resolved is not None and resolved.top_k > 0:
        block = plain_block(str(info.device).split(":")[0])
        top_k = 2 * batch * info.n_heads * min(block, length) * length * 4
    weights = _parameter_count(info) * dtype_bytes
    return RUNTIME_OVERHEAD_BYTES + weights + kv_cache + activations + output_head + top_k


def longest_length_within(
    info: ModelInfo,
    budget_bytes: int,
    batch: int = 1,
    dtype_bytes: int = 4,
    policy: Policy | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> int:
    """The longest ``length`` whose :func:`estimate_forward_memory` fits ``budget_bytes`` (0 if none does)."""
    low, high = 0, 1
    while estimate_forward_memory(info, high, batch, dtype_bytes, policy, chunk) <= budget_bytes:
        low, high = high, high * 2
        if high > 2**40:  # the estimate does not grow (cannot happen with a finite model); stop anyway
            return low
    while high - low > 1:  # invariant: low fits (or is 0), high does not
        middle = (low + high) // 2
        if estimate_forward_memory(info, middle, batch, dtype_bytes, policy, chunk) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def available_memory(device: torch.device) -> int | None:
    """Bytes the forward may use: free GPU memory, or MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(
    info: ModelInfo,
    length: int,
    policies: list[Policy],
    device: torch.device,
    resident_bytes: int = 0,
    label: str = "--length",
) -> None:
    """Refuse a run that would not fit, saying which length would.

    Args:
        resident_bytes: memory the loaded model already holds (counted in the estimate, gone from
            "available").
    """
    available = available_memory(device)
    if available is None:
        return
    dtype_bytes = torch.finfo(getattr(torch, info.dtype)).bits // 8

    def need(n: int) -> int:
        return (
            max(estimate_forward_memory(info, n, dtype_bytes=dtype_bytes, policy=p) for p in policies)
            - resident_bytes
        )

    if need(length) <= available:
        return
    fits = length
    while fits > 256 and need(fits) > available:
        fits = int(fits * 0.8)
    raise OodlensError(
        f"a {length}-token forward needs about {need(length) / 2**30:.1f} GiB more but only "
        f"{available / 2**30:.1f} GiB is available on {device}; try {label} {fits} or a smaller model/dtype"
    )
