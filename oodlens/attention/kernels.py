"""Kernels: attention over one segment of keys, returning the output, the log-sum-exp and (for observers)
the expected logit, and the log-sum-exp merge of several segments.

Three kernels, chosen per segment by :func:`run_segment`: oodlens' CPU kernel (``cpu_kernel``) when an
observer needs the entropy in float32 on a CPU; PyTorch's fused kernels (CPU flash / CUDA memory-efficient
attention, verified once per device and dtype against the reference); the float32 reference otherwise
(soft-capping, other devices).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import cpu_kernel

NEG_INF = float("-inf")


@dataclass
class Segment:
    """One kernel call: a row range of the query block against a set of keys.

    ``keys`` and ``values`` are ``[B, Hkv, S, D]``; ``queries`` ``[B, Hq, R, D]``; ``mask`` is ``None``,
    ``"causal"`` (square, top-left aligned) or a boolean ``[R, S]`` tensor (True = attend); ``key_index`` says
    which of the layer's keys these are (for observers, which rebuild logit rows from the segments).
    """

    rows: slice
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | str | None = None
    key_index: slice | None = None


@dataclass
class Partial:
    """Result of one segment for its rows: ``out [B,H,R,D]``, ``lse [B,H,R]``, ``mean_logit [B,H,R]``
    (float32)."""

    out: torch.Tensor
    lse: torch.Tensor
    mean_logit: torch.Tensor | None


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def explicit_logits(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """Float32 logits ``[B, Hq, R, S]`` for queries ``[B, Hq, R, D]`` and keys ``[B, Hkv, S, D]``.

    Query heads that share a key head (GQA) are stacked into one matmul instead of repeating the keys.
    """
    batch, heads, rows, dim = queries.shape
    kv_heads = keys.shape[1]
    stacked = queries.float().reshape(batch, kv_heads, (heads // kv_heads) * rows, dim)
    logits = (stacked @ keys.float().transpose(-1, -2)).view(batch, heads, rows, -1).mul_(scale)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _segment_math(seg: Segment, scale: float, softcap: float | None, want_mean: bool) -> Partial:
    """Reference kernel in float32 (any device, soft-capping); memory O(R × S) per head."""
    logits = explicit_logits(seg.queries, seg.keys, scale, softcap)
    if isinstance(seg.mask, torch.Tensor):
        logits = logits.masked_fill(~seg.mask, NEG_INF)
    elif seg.mask == "causal":
        n = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=logits.device).triu(1), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    out = probs @ expand_kv(seg.values, probs.shape[1]).float()
    mean = (probs * logits.nan_to_num(neginf=0.0)).sum(-1) if want_mean else None
    return Partial(out, lse, mean)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask; its rows are padded to a multiple of 16 (then sliced) as CUDA's kernel needs aligned
    rows."""
    rows, cols = mask.shape
    aligned = torch.zeros(rows, -(-cols // 16) * 16, dtype=dtype, device=mask.device)
    return aligned[:, :cols].masked_fill_(~mask, NEG_INF)


def _segment_fused(seg: Segment, scale: float, want_mean: bool) -> Partial:
    """Fused kernel (CPU flash / CUDA memory-efficient attention) that also returns the log-sum-exp.

    With ``want_mean`` the keys ride along as extra value channels, giving ``Σ_j p_j k_j`` in the same pass
    (on CPU queries and keys are zero-padded to the same width, as that kernel needs equal head sizes).
    """
    q, k, v = seg.queries, seg.keys, seg.values
    d = q.shape[-1]
    on_cuda = q.device.type == "cuda"
    if want_mean:
        v = torch.cat((v, k), dim=-1)
        if not on_cuda:  # CUDA's kernel takes wider values; the CPU one needs equal head sizes
            q = torch.nn.functional.pad(q, (0, d))
            k = torch.nn.functional.pad(k, (0, d))
    causal = isinstance(seg.mask, str)
    float_mask = _float_mask(seg.mask, q.dtype) if isinstance(seg.mask, torch.Tensor) else None
    if on_cuda:
        n_heads = q.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q,
            expand_kv(k, n_heads),
            expand_kv(v, n_heads),
            None if float_mask is None else float_mask.expand(q.shape[0], n_heads, *float_mask.shape),
            True,
            0.0,
            causal,
            scale=scale,
        )[:2]
        lse = lse[..., : q.shape[2]]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=causal, attn_mask=float_mask, scale=scale
        )
    out = out.float()
    mean = None
    if want_mean:
        mean = (seg.queries.float() * out[..., d:]).sum(-1) * scale
        out = out[..., :d]
    return Partial(out, lse.float(), mean)


_FUSED_VERIFIED: dict[tuple[str, torch.dtype], bool] = {}


def fused_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Check once per device type and dtype that the fused kernel agrees with the float32 reference.

    The fused kernels are private PyTorch operators whose signatures move between releases; on a mismatch or
    an error we warn once and use the reference kernel instead of returning wrong numbers.
    """
    token = (device.type, dtype)
    if token not in _FUSED_VERIFIED:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, n, 16, generator=gen).to(device, dtype) for n in (8, 12, 12))
        mask = torch.ones(8, 12, dtype=torch.bool, device=device).tril(4)
        ok = True
        try:
            for seg in (
                Segment(slice(0, 8), q, k[:, :2], v[:, :2], mask),
                Segment(slice(0, 8), q, k[:, :2, :8], v[:, :2, :8], "causal"),
            ):
                fused, ref = _segment_fused(seg, 0.25, True), _segment_math(seg, 0.25, None, True)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                ok &= all(
                    torch.allclose(a, b, atol=tol, rtol=tol)
                    for a, b in (
                        (fused.out, ref.out),
                        (fused.lse, ref.lse),
                        (fused.mean_logit, ref.mean_logit),
                    )
                )
        except (RuntimeError, TypeError) as error:
            ok = False
            warnings.warn(
                f"oodlens: fused attention kernel unavailable on {device.type} ({error}); using the "
                "float32 reference kernel (slower)",
                stacklevel=2,
            )
        else:
            if not ok:
                warnings.warn(
                    f"oodlens: fused attention kernel disagrees with the reference on {device.type}; "
                    "using the float32 reference kernel (slower)",
                    stacklevel=2,
                )
        _FUSED_VERIFIED[token] = ok
    return _FUSED_VERIFIED[token]


def run_segment(seg: Segment, scale: float, softcap: float | None, want_mean: bool) -> Partial:
    """Dispatch one segment: oodlens' CPU kernel when the mean logit is wanted in float32 on a CPU where it
    builds (built on that first need, so runs without observers never compile it), else PyTorch's fused
    kernel when it can serve the segment, else the float32 reference."""
    q = seg.queries
    differentiable = torch.is_grad_enabled() and q.requires_grad  # the compiled kernel has no backward
    if (
        want_mean
        and softcap is None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and not differentiable
    ):
        if cpu_kernel.compiled() is not None:
            return Partial(*cpu_kernel.entropy_attention(q, seg.keys, seg.values, seg.mask, scale))
    if softcap is None and q.device.type in ("cpu", "cuda") and fused_kernel_works(q.device, q.dtype):
        return _segment_fused(seg, scale, want_mean)
    return _segment_math(seg, scale, softcap, want_mean)


def merge_partials(parts: list[tuple[slice, Partial]], shape: tuple[int, int, int, int], device) -> Partial:
    """Combine partial softmax results over disjoint key sets (log-sum-exp identity), in float32.

    Args:
        parts: ``(rows, partial)`` pairs; the first must cover every row so each row's total is finite.
        shape: ``(B, H, C, D)`` of the merged output.
    """
    batch, heads, rows, dim = shape
    lse = torch.full((batch, heads, rows), NEG_INF, device=device)
    for index, part in parts:
        lse[:, :, index] = torch.logaddexp(lse[:, :, index], part.lse)
    out = torch.zeros(shape, device=device)
    want_mean = parts[0][1].mean_logit is not None
    mean = torch.zeros(batch, heads, rows, device=device) if want_mean else None
    for index, part in parts:
        weight = torch.exp(part.lse - lse[:, :, index])
        out[:, :, index].addcmul_(part.out, weight.unsqueeze(-1))
        if want_mean:
            mean[:, :, index].addcmul_(part.mean_logit, weight)
    return Partial(out, lse, mean)
