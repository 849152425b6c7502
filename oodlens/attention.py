"""The attention engine: one blockwise attention routine that serves every policy and every observer.

It is registered once with transformers' ``AttentionInterface`` (and a matching compact mask function with
``AttentionMaskInterface``), so every model family that calls the attention interface runs through it
without any patched model class.

For each block of queries the engine asks the :class:`~oodlens.policies.Policy` which keys are visible and
at which distance, splits those keys into *segments* that a fused kernel can run without an n×n mask,
runs each segment, and merges the partial results by log-sum-exp (the online-softmax identity):

    local band, fully visible part   keys (i_last - W, i_first)    plain kernel call, no mask
    local band, diagonal             keys [i_first, i_last]        causal kernel call
    local band, leading triangle     keys (i_first - W, i_last - W] small C×C mask
    far keys (Λ's starting tokens)   keys j < n_global, i - j ≥ W  query re-rotated to the distance limit
    top-k middle keys                per head, the k best          explicit gather (O(n²) selection)

Memory is O(n · block) and never O(n²). Statistics for observers (log-sum-exp, entropy, sink mass and
sampled logit rows) are computed from the same segments in float32: entropy uses
``H = lse - E_p[logit]`` with ``E_p[logit] = scale · <q, Σ_j p_j k_j>`` obtained by attending with the keys
appended to the values, so the full score matrix is never formed.

Shapes follow transformers: query ``[B, Hq, Q, D]``, key/value ``[B, Hkv, K, D]`` (already rotated by the
model at their absolute positions, GQA not repeated), output ``[B, Q, Hq, D]``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import kernel
from .errors import OodlensError
from .rope import RotarySpec

ATTENTION_NAME = "oodlens"
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------------
# What a policy and an observer look like to the engine
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """The resolved rules for one attention layer.

    Attributes:
        window: keys with ``i - j < window`` are local (true RoPE distance); ``None`` means every key.
        n_global: keys with real position ``j < n_global`` stay visible beyond the window ("far" keys).
        far_distance: distance at which far keys are seen (``None``: their true distance).
        top_k: number of extra middle keys per query and head (0: none).
        top_k_distance: distance at which the top-k middle keys are seen.
        rotary: how this layer rotates; needed whenever a distance is rewritten.
    """

    window: int | None = None
    n_global: int = 0
    far_distance: int | None = None
    top_k: int = 0
    top_k_distance: int | None = None
    rotary: RotarySpec | None = None

    @property
    def is_vanilla(self) -> bool:
        return self.window is None and self.top_k == 0


@dataclass
class BlockStats:
    """Per-query statistics of one block of queries in one layer, handed to observers (all float32).

    Attributes:
        query_positions: ``[C]`` real positions of the queries (0 = first real token).
        lse: ``[B, H, C]`` log-sum-exp of the logits each query used.
        entropy: ``[B, H, C]`` attention entropy in nats.
        sink_mass: ``[B, H, C]`` probability mass on keys at real positions ``< observer.sink_tokens``.
        sampled_positions: ``[R]`` positions of the queries whose full logit rows are given.
        sampled_logits: ``[B, H, R, K']`` logits of those rows (``-inf`` where a key is not attended).
        sampled_distances: ``[R, K']`` true distance ``i - j`` of each entry (negative where ``j > i``).
    """

    query_positions: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor | None
    sampled_positions: torch.Tensor
    sampled_logits: torch.Tensor | None
    sampled_distances: torch.Tensor | None


class AttentionObserver(Protocol):
    """Receives :class:`BlockStats`; implemented by :mod:`oodlens.capture`."""

    sink_tokens: int

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices into ``positions`` (``[C]``) whose full logit rows the observer wants (may be empty)."""

    def observe(self, layer_idx: int, stats: BlockStats) -> None:
        """Reduce one block's statistics; must not keep references to large tensors."""


@dataclass
class Binding:
    """What the engine needs to know about one attention module."""

    plan: LayerPlan
    observer: AttentionObserver | None = None
    block_size: int | None = None


_BINDINGS: weakref.WeakKeyDictionary[nn.Module, Binding] = weakref.WeakKeyDictionary()


def bind(module: nn.Module, binding: Binding) -> None:
    """Route ``module``'s attention through the engine with ``binding``."""
    _BINDINGS[module] = binding


def unbind(module: nn.Module) -> None:
    _BINDINGS.pop(module, None)


def binding_of(module: nn.Module) -> Binding | None:
    return _BINDINGS.get(module)


# --------------------------------------------------------------------------------------------------------
# Key layouts: which absolute position each cached key has
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyLayout:
    """Keys ``[0, head)`` are the first tokens; the rest are the contiguous tail ending at ``total - 1``."""

    head: int
    total: int


_LAYOUTS: dict[int, KeyLayout] = {}


def register_layout(keys: torch.Tensor, layout: KeyLayout) -> None:
    """Tell the engine the layout of a key tensor returned by a bounded cache (see :mod:`oodlens.cache`)."""
    token = id(keys)
    _LAYOUTS[token] = layout
    weakref.finalize(keys, _LAYOUTS.pop, token, None)


def _key_positions(key: torch.Tensor, total: int) -> torch.Tensor:
    """Absolute positions ``[K]`` of the keys, for full, sliding (tail only) and bounded (head + tail) caches."""
    n_keys = key.shape[-2]
    layout = _LAYOUTS.get(id(key))
    head = layout.head if layout is not None else 0
    if layout is not None:
        total = layout.total
    if n_keys > total:
        raise OodlensError(
            f"got {n_keys} keys for {total} tokens: static (pre-allocated) caches are not supported; "
            "use the default dynamic cache or oodlens' bounded cache"
        )
    positions = torch.arange(n_keys, device=key.device)
    positions[head:] += total - n_keys
    return positions


# --------------------------------------------------------------------------------------------------------
# Kernels: attention over one segment, returning output, log-sum-exp and the expected logit
# --------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One kernel call: a row range of the query block against a set of keys.

    ``keys`` and ``values`` are ``[B, Hkv, S, D]``; ``queries`` ``[B, Hq, R, D]``; ``mask`` is ``None``,
    ``"causal"`` (square, top-left aligned) or a boolean ``[R, S]`` tensor (True = attend).
    """

    rows: slice
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | str | None = None


@dataclass
class Partial:
    """Result of one segment for its rows: ``out [B,H,R,D]``, ``lse [B,H,R]``, ``mean_logit [B,H,R]`` (float32)."""

    out: torch.Tensor
    lse: torch.Tensor
    mean_logit: torch.Tensor | None


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
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
    out = probs @ _expand_kv(seg.values, probs.shape[1]).float()
    mean = (probs * logits.nan_to_num(neginf=0.0)).sum(-1) if want_mean else None
    return Partial(out, lse, mean)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask; its rows are padded to a multiple of 16 (then sliced) as CUDA's kernel needs aligned rows."""
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
            _expand_kv(k, n_heads),
            _expand_kv(v, n_heads),
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
    if want_mean and softcap is None and q.device.type == "cpu" and q.dtype == torch.float32:
        if kernel.compiled() is not None:
            return Partial(*kernel.entropy_attention(q, seg.keys, seg.values, seg.mask, scale))
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


# --------------------------------------------------------------------------------------------------------
# The blockwise routine for one batch group sharing the same positions
# --------------------------------------------------------------------------------------------------------


@dataclass
class RowGroup:
    """Queries and keys of batch rows that share positions (all rows, or one padded row).

    ``q_pos``/``k_pos`` are real positions (0 = first real token); ``q_rot``/``k_rot`` the positions at which
    the model rotated them (real position plus a constant per row).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    rotation_offset: int
    far_keys: torch.Tensor | None = field(default=None)
    unrotated_keys: torch.Tensor | None = field(default=None)


DEFAULT_BLOCK = 1024
OBSERVED_BLOCK = 512
MATH_BLOCK = 128


def _far_queries(
    plan: LayerPlan, group: RowGroup, q: torch.Tensor, pos: torch.Tensor, distance: int
) -> torch.Tensor:
    """Queries re-rotated so that an unrotated key sits at ``distance`` from them."""
    rotation = pos + group.rotation_offset
    return plan.rotary.move(q, rotation, torch.full_like(rotation, distance))


def _unrotated(plan: LayerPlan, group: RowGroup, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return plan.rotary.rotate(keys, pos + group.rotation_offset, sign=-1.0)


def _block_segments(plan: LayerPlan, group: RowGroup, start: int, stop: int) -> list[Segment]:
    """The segments of query rows ``[start, stop)``; diagonal first so every row's lse is finite early."""
    q = group.query[:, :, start:stop]
    q_pos = group.q_pos[start:stop]
    k_pos = group.k_pos
    first, last = int(q_pos[0]), int(q_pos[-1])
    window = plan.window
    segments: list[Segment] = []

    # Diagonal: keys at the block's own positions (always present: a query sees itself).
    d_lo, d_hi = torch.searchsorted(k_pos, torch.tensor([first, last + 1], device=k_pos.device)).tolist()
    if d_hi - d_lo == stop - start and (window is None or window >= stop - start):
        segments.append(
            Segment(
                slice(0, stop - start), q, group.key[:, :, d_lo:d_hi], group.value[:, :, d_lo:d_hi], "causal"
            )
        )
    else:
        mask = k_pos[d_lo:d_hi][None] <= q_pos[:, None]
        if window is not None:
            mask &= k_pos[d_lo:d_hi][None] > q_pos[:, None] - window
        segments.append(
            Segment(slice(0, stop - start), q, group.key[:, :, d_lo:d_hi], group.value[:, :, d_lo:d_hi], mask)
        )

    # Keys before the block inside the local band.
    lowest_local = -1 if window is None else first - window  # keys must be > this for the first query
    all_see = -1 if window is None else last - window  # keys > this are local for every query in the block
    lo = int(torch.searchsorted(k_pos, torch.tensor(lowest_local + 1, device=k_pos.device)))
    mid = int(torch.searchsorted(k_pos, torch.tensor(all_see + 1, device=k_pos.device)))
    mid = max(mid, lo)
    if d_lo > mid:
        segments.append(
            Segment(slice(0, stop - start), q, group.key[:, :, mid:d_lo], group.value[:, :, mid:d_lo])
        )
    if min(mid, d_lo) > lo:
        hi = min(mid, d_lo)
        mask = k_pos[lo:hi][None] > q_pos[:, None] - window
        rows = mask.any(-1).nonzero()
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        segments.append(
            Segment(
                slice(r0, r1), q[:, :, r0:r1], group.key[:, :, lo:hi], group.value[:, :, lo:hi], mask[r0:r1]
            )
        )

    # Far keys: starting tokens that are outside the band for at least the block's last query. They are
    # seen at the distance limit (or at their true distance when the policy keeps it).
    if window is not None and plan.n_global > 0:
        far_hi = min(int(torch.searchsorted(k_pos, torch.tensor(plan.n_global, device=k_pos.device))), mid)
        if far_hi > 0:
            mask = k_pos[:far_hi][None] <= q_pos[:, None] - window
            rows = mask.any(-1).nonzero()
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            if plan.far_distance is None:
                far_q, far_k = q[:, :, r0:r1], group.key[:, :, :far_hi]
            else:
                far_q = _far_queries(plan, group, q[:, :, r0:r1], q_pos[r0:r1], plan.far_distance)
                far_k = group.far_keys[:, :, :far_hi]
            full = bool(mask[r0:r1].all())
            segments.append(
                Segment(
                    slice(r0, r1), far_q, far_k, group.value[:, :, :far_hi], None if full else mask[r0:r1]
                )
            )
    return segments


def _top_k_partial(
    plan: LayerPlan,
    group: RowGroup,
    start: int,
    stop: int,
    scale: float,
    softcap: float | None,
    want_mean: bool,
) -> tuple[slice, Partial] | None:
    """Each head's ``top_k`` highest-logit middle keys (not global, not local), seen at ``top_k_distance``."""
    q_pos = group.q_pos[start:stop]
    k_pos = group.k_pos
    middle_lo = int(torch.searchsorted(k_pos, torch.tensor(plan.n_global, device=k_pos.device)))
    middle_hi = int(
        torch.searchsorted(k_pos, torch.tensor(int(q_pos[-1]) - plan.window + 1, device=k_pos.device))
    )
    if middle_hi <= middle_lo:
        return None
    valid = k_pos[middle_lo:middle_hi][None] <= q_pos[:, None] - plan.window
    rows = valid.any(-1).nonzero()
    r0 = int(rows[0])
    rows_slice = slice(r0, stop - start)
    q = _far_queries(plan, group, group.query[:, :, start + r0 : stop], q_pos[r0:], plan.top_k_distance)
    keys = group.unrotated_keys[:, :, middle_lo:middle_hi]
    logits = explicit_logits(q, keys, scale, softcap).masked_fill(~valid[r0:], NEG_INF)
    k = min(plan.top_k, middle_hi - middle_lo)
    best, index = logits.topk(k, dim=-1)  # [B, H, R, k]
    values = _expand_kv(group.value[:, :, middle_lo:middle_hi], q.shape[1]).float()
    chosen = torch.gather(
        values.unsqueeze(2).expand(-1, -1, index.shape[2], -1, -1),
        3,
        index.unsqueeze(-1).expand(-1, -1, -1, -1, values.shape[-1]),
    )  # [B, H, R, k, D]
    lse = torch.logsumexp(best, dim=-1)
    probs = torch.exp(best - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = (probs.unsqueeze(-1) * chosen).sum(-2)
    mean = (probs * best.nan_to_num(neginf=0.0)).sum(-1) if want_mean else None
    return rows_slice, Partial(out, lse, mean)


def _sampled_rows(
    plan: LayerPlan, group: RowGroup, start: int, rows: torch.Tensor, scale: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logit rows (local + far keys as the policy sees them) for a few queries: ``[B,H,R,K]``, ``[R,K]``."""
    index = start + rows
    q = group.query[:, :, index]
    q_pos = group.q_pos[index]
    k_pos = group.k_pos
    distance = q_pos[:, None] - k_pos[None]
    local = distance >= 0
    if plan.window is not None:
        local &= distance < plan.window
    logits = explicit_logits(q, group.key, scale, softcap).masked_fill(~local, NEG_INF)
    if plan.window is not None and plan.n_global > 0:
        far = (distance >= plan.window) & (k_pos[None] < plan.n_global)
        if far.any():
            far_hi = int(far.any(0).nonzero()[-1]) + 1
            if plan.far_distance is None:
                far_q, far_k = q, group.key[:, :, :far_hi]
            else:
                far_q = _far_queries(plan, group, q, q_pos, plan.far_distance)
                far_k = group.far_keys[:, :, :far_hi]
            far_logits = explicit_logits(far_q, far_k, scale, softcap)
            logits[..., :far_hi] = torch.where(far[:, :far_hi], far_logits, logits[..., :far_hi])
    return logits, distance


def _sink_mass(
    plan: LayerPlan,
    group: RowGroup,
    start: int,
    stop: int,
    lse: torch.Tensor,
    n_sink: int,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Probability mass ``[B, H, C]`` that each query puts on the first ``n_sink`` real tokens."""
    n_keys = int(torch.searchsorted(group.k_pos, torch.tensor(n_sink, device=group.k_pos.device)))
    if n_keys == 0:
        return torch.zeros_like(lse)
    sub = RowGroup(
        group.query,
        group.key[:, :, :n_keys],
        group.value[:, :, :n_keys],
        group.q_pos,
        group.k_pos[:n_keys],
        group.rotation_offset,
        None if group.far_keys is None else group.far_keys[:, :, :n_keys],
    )
    logits, _ = _sampled_rows(plan, sub, start, torch.arange(stop - start, device=lse.device), scale, softcap)
    return torch.exp(logits - lse.unsqueeze(-1)).sum(-1)


def attend_group(
    plan: LayerPlan,
    group: RowGroup,
    scale: float,
    softcap: float | None,
    observer: AttentionObserver | None,
    layer_idx: int,
    block_size: int | None,
) -> torch.Tensor:
    """Attention for one row group; returns ``[B, Hq, Q, D]`` in the query dtype."""
    batch, heads, n_queries, dim = group.query.shape
    want_mean = observer is not None
    if plan.window is not None and plan.far_distance is not None and plan.n_global > 0:
        group.far_keys = _unrotated(
            plan,
            group,
            group.key[:, :, : min(plan.n_global, group.key.shape[2])],
            group.k_pos[: min(plan.n_global, group.key.shape[2])],
        )
    if plan.top_k > 0:
        group.unrotated_keys = _unrotated(plan, group, group.key, group.k_pos)
    if block_size is None:
        if softcap is not None:
            block_size = MATH_BLOCK  # the float32 reference kernel holds block × keys logits per head
        elif observer is not None:
            block_size = OBSERVED_BLOCK
        else:  # one fused call covers plain causal attention; banded policies need blocks
            block_size = n_queries if plan.is_vanilla else DEFAULT_BLOCK
        if plan.window is not None:
            block_size = min(block_size, plan.window)
    output = torch.empty(batch, n_queries, heads, dim, dtype=group.query.dtype, device=group.query.device)
    for start in range(0, n_queries, block_size):
        stop = min(start + block_size, n_queries)
        parts = [
            (seg.rows, run_segment(seg, scale, softcap, want_mean))
            for seg in _block_segments(plan, group, start, stop)
        ]
        if plan.top_k > 0:
            extra = _top_k_partial(plan, group, start, stop, scale, softcap, want_mean)
            if extra is not None:
                parts.append(extra)
        acc = (
            merge_partials(parts, (batch, heads, stop - start, dim), group.query.device)
            if len(parts) > 1
            else parts[0][1]
        )
        output[:, start:stop] = acc.out.transpose(1, 2).to(output.dtype)
        if observer is not None:
            positions = group.q_pos[start:stop]
            rows = observer.select_queries(positions)
            sampled = (
                _sampled_rows(plan, group, start, rows, scale, softcap) if rows.numel() else (None, None)
            )
            sink = (
                _sink_mass(plan, group, start, stop, acc.lse, observer.sink_tokens, scale, softcap)
                if observer.sink_tokens > 0
                else None
            )
            observer.observe(
                layer_idx,
                BlockStats(positions, acc.lse, acc.lse - acc.mean_logit, sink, positions[rows], *sampled),
            )
    return output


# --------------------------------------------------------------------------------------------------------
# The function registered with transformers
# --------------------------------------------------------------------------------------------------------


def _layer_plan(module: nn.Module, binding: Binding | None, sliding_window: int | None) -> LayerPlan:
    """The model's own sliding-window layers keep their trained behaviour; the policy applies to full layers."""
    plan = binding.plan if binding is not None else LayerPlan()
    if sliding_window is not None:
        return LayerPlan(window=sliding_window, rotary=plan.rotary)
    return plan


def oodlens_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention through the bound policy and observer (see module docstring). Returns ``([B,Q,Hq,D], None)``."""
    if dropout and module.training:
        raise OodlensError("oodlens attention is for inference: call model.eval() before running it")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise OodlensError(
            f"{type(module).__name__} uses learned attention sinks, which oodlens does not support"
        )
    binding = binding_of(module)
    layer_idx = getattr(module, "layer_idx", 0) or 0
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    plan = _layer_plan(module, binding, sliding_window)
    observer = binding.observer if binding is not None else None
    block_size = binding.block_size if binding is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    batch, _, n_queries, _ = query.shape
    padding = (
        attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    )
    if padding is not None:
        total = padding.shape[-1]
    elif position_ids is not None:
        total = int(position_ids[:, -1].max()) + 1
    else:
        total = key.shape[-2]
    k_abs = _key_positions(key, total)
    q_abs = torch.arange(total - n_queries, total, device=query.device)

    def rotation_offset(row: int, pad: int) -> int:
        if position_ids is None:
            return pad
        return int(position_ids[min(row, position_ids.shape[0] - 1), -1]) - (total - 1 - pad)

    if padding is None:
        group = RowGroup(query, key, value, q_abs, k_abs, rotation_offset(0, 0))
        if position_ids is not None and batch > 1 and not (position_ids == position_ids[:1]).all():
            raise OodlensError(
                "rows with different position_ids need an attention_mask that marks their padding"
            )
        output = attend_group(plan, group, scale, softcap, observer, layer_idx, block_size)
        return output.contiguous(), None

    output = torch.zeros(
        batch, n_queries, query.shape[1], query.shape[-1], dtype=query.dtype, device=query.device
    )
    for row in range(batch):
        valid = padding[row].bool()
        pad = int((~valid).cumprod(0).sum())
        if not bool(valid[pad:].all()):
            raise OodlensError("only left padding is supported (padding found between real tokens)")
        keep_k = k_abs >= pad
        keep_q = q_abs >= pad
        if not bool(keep_q.any()):
            continue
        group = RowGroup(
            query[row : row + 1][:, :, keep_q],
            key[row : row + 1][:, :, keep_k],
            value[row : row + 1][:, :, keep_k],
            q_abs[keep_q] - pad,
            k_abs[keep_k] - pad,
            rotation_offset(row, pad),
        )
        output[row : row + 1, keep_q] = attend_group(
            plan, group, scale, softcap, observer, layer_idx, block_size
        )
    return output, None


def compact_padding_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: pass on the 2-D padding mask instead of an n×n mask.

    The engine works from positions, so all it needs to know is which tokens are padding.
    """
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


_REGISTERED = False


def register() -> str:
    """Register the engine with transformers (idempotent); returns the attention implementation name."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_NAME, oodlens_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, compact_padding_mask)
        _REGISTERED = True
    return ATTENTION_NAME


__all__ = [
    "ATTENTION_NAME",
    "AttentionObserver",
    "Binding",
    "BlockStats",
    "KeyLayout",
    "LayerPlan",
    "bind",
    "unbind",
    "binding_of",
    "register",
    "register_layout",
    "explicit_logits",
]
