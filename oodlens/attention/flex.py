"""The fused path for long prefills on a GPU: a band plan's keys in at most two FlexAttention calls instead of
a few kernel calls per block of queries.

    local keys    0 ≤ i - j < W              one call, block mask of the band (built once per shape)
    far keys      i - j ≥ W, j < n_global    a second call, moved queries and keys
    merged by log-sum-exp, in one compiled kernel on a GPU

The band's block mask lets the kernel skip every block of keys outside it: O(n · W) work. The far call is
small when the far keys are few (LM-Infinite's and StreamingLLM's starting tokens fill one block of keys);
for the distance limit, ReRoPE, Self-Extend and STRING every key beyond the window is far, so that call is
O(n²) as the method is. The segment path (:mod:`.blockwise`) stays the reference this path is tested against,
and serves everything :func:`serves` declines.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compiling import can_compile, compile_budget, compiled, fused_mode, fused_on_gpu
from .plan import LayerPlan

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # an old PyTorch: the segment path serves every call
    _flex = None

# A guess, not a measurement: the smallest length measured (8k) already ran 2.4× faster fused than in
# segments; below a few thousand queries the segment path's few blocks need no mask to be built.
MIN_FUSED_QUERIES = 4096
_MASK_CACHE_SIZE = 8
_masks: OrderedDict[tuple, object] = OrderedDict()


@dataclass
class FarKeys:
    """What a band plan's far call needs: the first query row that sees a far key, the moved queries of a
    row range, and the moved far keys (the first ``keys.shape[2]`` keys of the call)."""

    first_row: int
    queries: Callable[[slice], torch.Tensor]
    keys: torch.Tensor


def serves(
    plan: LayerPlan, query: torch.Tensor, *, softcap: float | None, observed: bool, block_size: int | None
) -> bool:
    """Whether the fused path runs this call (one answer for the engine): a band plan (a window; no top-k
    middle keys, no chunks), no soft-cap, no observer, no fixed block size, no gradient, a power-of-two head
    size; on a GPU in half precision (compiled FlexAttention refused float32 with small heads on the H200,
    and float32 there is for exactness, which the segment path gives) with at least
    :data:`MIN_FUSED_QUERIES` queries, or anywhere under ``fused_attention("always")``."""
    head_dim, n_queries, device = query.shape[-1], query.shape[2], query.device
    band = plan.window is not None and plan.chunk is None and plan.top_k == 0
    plain = softcap is None and not observed and block_size is None
    gradient = torch.is_grad_enabled() and query.requires_grad  # the CPU's FlexAttention has no backward
    if _flex is None or fused_mode() == "never" or not (band and plain) or gradient:
        return False
    if head_dim < 16 or head_dim & (head_dim - 1):
        return False
    half = query.dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and not (half and can_compile(device)):
        return False
    if fused_mode() == "always":
        return True
    return device.type == "cuda" and n_queries >= MIN_FUSED_QUERIES


def clear_caches() -> None:
    """Drop the block masks kept for reuse (each holds index tables of its shape and its position tensors)."""
    _masks.clear()


def _key_signature(positions: torch.Tensor) -> tuple[int, ...]:
    """Host positions (sorted, distinct) as (count, first, last, index of the first gap): enough to tell two
    position vectors apart when each is contiguous but for at most one gap (every cache oodlens makes)."""
    gaps = torch.nonzero(positions[1:] - positions[:-1] != 1)
    if gaps.numel() > 1:
        return (-1,)  # not cacheable
    gap = int(gaps[0, 0]) + 1 if gaps.numel() else 0
    return (positions.numel(), int(positions[0]), int(positions[-1]), gap)


def _block_mask(kind: str, window: int, q_pos, k_pos, q_host, k_host):
    """The block mask of ``kind`` ("local": 0 ≤ i - j < W; "far": i - j ≥ W) for these positions, built once
    per shape and position layout (a model's layers share it)."""
    signature = (_key_signature(q_host), _key_signature(k_host))
    key = (kind, window, q_pos.device, *signature)
    cacheable = (-1,) not in signature
    if cacheable and key in _masks:
        _masks.move_to_end(key)
        return _masks[key]

    def local(batch, head, q_index, k_index):
        distance = q_pos[q_index] - k_pos[k_index]
        return (distance >= 0) & (distance < window)

    def far(batch, head, q_index, k_index):
        return q_pos[q_index] - k_pos[k_index] >= window

    with compile_budget():
        mask = _flex.create_block_mask(
            local if kind == "local" else far,
            None,
            None,
            q_pos.numel(),
            k_pos.numel(),
            device=q_pos.device,
            _compile=can_compile(q_pos.device),  # compiled: memory O(n), not a dense n × n evaluation
        )
    if cacheable:
        _masks[key] = mask
        if len(_masks) > _MASK_CACHE_SIZE:
            _masks.popitem(last=False)
    return mask


def _eager_flex(*args, **kwargs):
    """FlexAttention without compiling (it writes out the scores: for tests on a CPU), quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex.flex_attention(*args, **kwargs)


def _kernel(device: torch.device):
    """FlexAttention, compiled on a GPU (eager it writes out the scores); eager elsewhere (tests)."""
    return compiled(_flex.flex_attention, dynamic=None) if can_compile(device) else _eager_flex


_RETURNS_AUX = _flex is not None and "return_aux" in inspect.signature(_flex.flex_attention).parameters


def _flex_call(query, key, value, block_mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Q, D], natural log-sum-exp [B, Hq, Q] float32)``; rows that see no key get -inf."""
    kernel = _kernel(query.device)
    gqa = query.shape[1] != key.shape[1]
    if _RETURNS_AUX:  # PyTorch ≥ 2.9 asks for the log-sum-exp through return_aux
        out, aux = kernel(
            query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa,
            return_aux=_flex.AuxRequest(lse=True),
        )  # fmt: skip
        return out, aux.lse.float()
    out, lse = kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    return out, lse.float()


def _merge(out: torch.Tensor, lse: torch.Tensor, far_out: torch.Tensor, far_lse: torch.Tensor):
    """Two partial softmax results over disjoint keys merged by log-sum-exp, in the outputs' dtype. Every row
    sees itself in the band, so ``lse`` is finite and so is the total."""
    total = torch.logaddexp(lse, far_lse)
    own = torch.exp(lse - total).unsqueeze(-1)
    other = torch.exp(far_lse - total).unsqueeze(-1)
    return (out.float() * own + far_out.float() * other).to(out.dtype)


def band_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_host: torch.Tensor,
    k_host: torch.Tensor,
    scale: float,
    window: int,
    far: FarKeys | None,
) -> torch.Tensor:
    """Attention of queries ``[B, Hq, Q, D]`` over the local band of keys ``[B, Hkv, K, D]`` at their true
    positions and, with ``far``, over the far keys once they are ``window`` or more behind, seen at the moved
    positions. Returns ``[B, Q, Hq, D]``."""
    local_mask = _block_mask("local", window, q_pos, k_pos, q_host, k_host)
    out, lse = _flex_call(query, key, value, local_mask, scale)
    if far is not None and far.first_row < q_host.numel():
        rows, n_far = slice(far.first_row, None), far.keys.shape[2]
        far_mask = _block_mask("far", window, q_pos[rows], k_pos[:n_far], q_host[rows], k_host[:n_far])
        far_out, far_lse = _flex_call(far.queries(rows), far.keys, value[:, :, :n_far], far_mask, scale)
        # out of place: FlexAttention's output stays as it returned it
        merged = fused_on_gpu(_merge)(out[:, :, rows], lse[:, :, rows], far_out, far_lse)
        out = torch.cat([out[:, :, : far.first_row], merged], dim=2)
    return out.transpose(1, 2)
