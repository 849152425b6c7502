"""The fused path for long prefills on a GPU: a band plan's keys in at most two FlexAttention calls instead of
a few kernel calls per block of queries.

    local keys    0 ≤ i - j < W              one call, block mask of the band (built once per shape)
    far keys      i - j ≥ W, j < n_global    a second call, moved queries and keys (LM-Infinite's starting
                                             tokens fill one block of keys; ReRoPE's far keys are all)
    merged by log-sum-exp, in one fused kernel on a GPU

The block mask lets the kernel skip every block of keys outside the band, so the work is O(n · W) rather
than O(n²). The segment path (:mod:`.blockwise`) stays the reference this path is tested against, and the
one used on a CPU, under observers, soft-capping, top-k middle keys, chunk plans and short calls.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from ..compiling import compile_budget, fused_on_gpu
from ..errors import OodlensError
from .kernels import NEG_INF

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # an old PyTorch: the segment path serves every call
    _flex = None

FusedMode = Literal["auto", "always", "never"]
MIN_FUSED_QUERIES = 4096  # shorter calls: the segment path's few blocks cost less than building a mask
_MASK_CACHE_SIZE = 8
_mode: FusedMode = "auto"
_masks: OrderedDict[tuple, object] = OrderedDict()
_compiled: dict[str, object] = {}


@contextlib.contextmanager
def fused_attention(mode: FusedMode) -> Iterator[None]:
    """Within the block: ``"auto"`` (the fused path for long calls on a GPU), ``"always"`` (wherever it can
    serve, a CPU included: for tests) or ``"never"`` (the segment path everywhere: for comparisons)."""
    global _mode
    if mode not in ("auto", "always", "never"):
        raise OodlensError(f"fused_attention takes 'auto', 'always' or 'never', got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def serves(device: torch.device, dtype: torch.dtype, n_queries: int, head_dim: int) -> bool:
    """Whether the fused path runs a band plan's call of ``n_queries`` on ``device`` (the caller has checked
    that the call has no observer, soft-cap, top-k or chunk plan).

    On a GPU only in half precision: compiled FlexAttention refused float32 with small heads on the H200
    (no kernel choice), and float32 there is for exactness, which the segment path gives."""
    if _flex is None or _mode == "never" or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        return False
    if device.type != "cuda" and torch.is_grad_enabled():  # FlexAttention has no backward on a CPU
        return False
    if _mode == "always":
        return True
    return device.type == "cuda" and n_queries >= MIN_FUSED_QUERIES


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
            _compile=q_pos.device.type == "cuda",  # compiled: memory O(n), not a dense n × n evaluation
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
    if device.type != "cuda":
        return _eager_flex
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(_flex.flex_attention)
    return _compiled["cuda"]


_RETURNS_AUX = _flex is not None and "return_aux" in inspect.signature(_flex.flex_attention).parameters


def _flex_call(query, key, value, block_mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Q, D], natural log-sum-exp [B, Hq, Q] float32)``; rows that see no key get -inf."""
    kernel = _kernel(query.device)
    gqa = query.shape[1] != key.shape[1]
    with compile_budget():
        if _RETURNS_AUX:  # PyTorch ≥ 2.9 asks for the log-sum-exp through return_aux
            out, aux = kernel(
                query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                return_aux=_flex.AuxRequest(lse=True),
            )  # fmt: skip
            lse = aux.lse
        else:
            out, lse = kernel(
                query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True
            )
    return out, lse.float().masked_fill(lse == float("inf"), NEG_INF)


def _merge(out: torch.Tensor, lse: torch.Tensor, far_out: torch.Tensor, far_lse: torch.Tensor):
    """Two partial softmax results over disjoint keys merged by log-sum-exp, in the outputs' dtype."""
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
    far: tuple[Callable[[slice], torch.Tensor], torch.Tensor, int] | None,
) -> torch.Tensor:
    """Attention of queries ``[B, Hq, Q, D]`` over the local band of keys ``[B, Hkv, K, D]`` at true positions
    and, when ``far = (moved queries of a row range, moved far keys, n_far)`` is given, over the first
    ``n_far`` keys once they are ``window`` or more behind, seen at the moved positions. ``[B, Q, Hq, D]``."""
    local_mask = _block_mask("local", window, q_pos, k_pos, q_host, k_host)
    out, lse = _flex_call(query, key, value, local_mask, scale)
    first = int(torch.searchsorted(q_host, k_host[:1] + window)) if far is not None else q_host.numel()
    if first < q_host.numel():  # rows from `first` on see a far key
        moved_queries, far_key, n_far = far
        rows = slice(first, None)
        far_mask = _block_mask("far", window, q_pos[rows], k_pos[:n_far], q_host[rows], k_host[:n_far])
        far_out, far_lse = _flex_call(moved_queries(rows), far_key, value[:, :, :n_far], far_mask, scale)
        out[:, :, rows] = fused_on_gpu(_merge)(out[:, :, rows], lse[:, :, rows], far_out, far_lse)
    return out.transpose(1, 2)
