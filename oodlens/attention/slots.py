"""One decoding step over a static bounded cache's slots (:class:`~oodlens.cache.StaticBoundedCache`).

The cache keeps its keys in fixed slots written in place, in no particular order, and says which true
position each slot holds (:class:`SlotLayout`). A band plan's rule is then a mask over the slots: a key is
local while ``i - j < window`` (seen where the model rotated it), far when ``j < n_global`` and beyond the
window (seen with query and key moved to the plan's far positions), else hidden. Every tensor stays on the
device and every shape is fixed, so the step never waits for the device and can be captured as a CUDA
graph. The logits of one query over a few thousand slots are small: they are written out in float32.
"""

from __future__ import annotations

import torch

from ..errors import OodlensError
from .kernels import NEG_INF, explicit_logits
from .plan import LayerPlan, SlotLayout


def attend_slots(
    plan: LayerPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SlotLayout,
    scale: float,
    softcap: float | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of queries ``[B, Hq, 1, D]`` over the slots ``[B, Hkv, S, D]``; returns ``[B, 1, Hq, D]``.

    The model rotated the query at ``position_ids`` (its true position when None): the difference is a
    rotation offset that every moved query and key keeps, as in the blockwise routine."""
    if plan.window is None or plan.chunk is not None or plan.top_k:
        raise OodlensError("a static bounded cache serves band plans with a window and no top-k keys")
    position = layout.query_position.view(1)
    slots = layout.positions
    offset = 0 if position_ids is None else position_ids[0, -1:] - position
    if plan.query_scale is not None:
        if plan.query_scale.length_coefficient is not None:
            raise OodlensError("a query scale that depends on the sequence length needs the whole sequence")
        query = query * plan.query_scale.factors(position, n_tokens=0).to(query.dtype)
    local = (slots >= 0) & (position - slots < plan.window)
    logits = explicit_logits(query, key, scale, softcap).masked_fill(~local, NEG_INF)
    n_far = min(plan.n_global, slots.numel())  # a key at position j < n_global sits in slot j
    if n_far:
        far_slots = slots[:n_far]
        far = (far_slots >= 0) & (position - far_slots >= plan.window)
        far_query, far_keys = query, key[:, :, :n_far]
        if not plan.far_query.is_identity:
            far_query = plan.rotary.move(query, position + offset, plan.far_query(position) + offset)
        if not plan.far_key.is_identity:
            far_keys = plan.rotary.move(far_keys, far_slots + offset, plan.far_key(far_slots) + offset)
        far_logits = explicit_logits(far_query, far_keys, scale, softcap)
        logits[..., :n_far] = torch.where(far, far_logits, logits[..., :n_far])
    probs = torch.softmax(logits, dim=-1)  # [B, Hq, 1, S]
    batch, heads = query.shape[:2]
    kv_heads = value.shape[1]
    # the query heads that share a key head, stacked
    out = probs.view(batch, kv_heads, heads // kv_heads, -1) @ value.float()
    return out.view(batch, heads, 1, value.shape[-1]).transpose(1, 2).to(query.dtype)

