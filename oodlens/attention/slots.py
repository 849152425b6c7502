"""One decoding step over a static bounded cache's slots (:class:`~oodlens.cache.StaticBoundedCache`).

The cache keeps its keys in fixed slots written in place, in no particular order, and says which true
position each slot holds (:class:`SlotLayout`). A band plan's rule is then a mask over the slots: a key is
local while ``i - j < window`` (seen where the model rotated it), far when ``j < n_global`` and beyond the
window. A far key is seen with query and key at the plan's far positions; since a logit depends only on the
difference of the two, the key alone is moved, to ``far_key(j) - far_query(i) + i``, and written into the
cache's scratch slots (unless the plan leaves far keys where they are), so that one attention call with a
mask covers the local and the far keys, in the model's precision, without copying the slots. Every tensor
stays on the device and every shape is fixed: the step never waits for the device and can be captured as a
CUDA graph.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

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
    rotation offset that every moved key keeps, as in the blockwise routine."""
    if plan.window is None or plan.chunk is not None or plan.top_k:
        raise OodlensError("a static bounded cache serves band plans with a window and no top-k keys")
    if plan.n_global > layout.scratch and layout.scratch:
        raise OodlensError(
            f"the plan keeps {plan.n_global} starting tokens but the static cache {layout.scratch}: "
            "make the cache with handle.new_cache(static=True)"
        )
    position = layout.query_position.view(1)
    slots = layout.positions
    if plan.query_scale is not None:
        if plan.query_scale.length_coefficient is not None:
            raise OodlensError("a query scale that depends on the sequence length needs the whole sequence")
        query = query * plan.query_scale.factors(position, n_tokens=0).to(query.dtype)
    visible = (slots >= 0) & (position - slots < plan.window)  # local keys
    n_far = min(plan.n_global, layout.scratch)
    if n_far:
        starting = slice(layout.scratch, layout.scratch + n_far)
        far_positions = slots[starting]
        far = (far_positions >= 0) & (far_positions < plan.n_global)
        far &= position - far_positions >= plan.window
        if plan.moves_far_keys:
            offset = 0 if position_ids is None else position_ids[0, -1:] - position
            moved_to = plan.far_key(far_positions) - plan.far_query(position) + position + offset
            key[:, :, :n_far] = plan.rotary.move(key[:, :, starting], far_positions + offset, moved_to)
            value[:, :, :n_far] = value[:, :, starting]
            visible[:n_far] = far
        else:  # seen where they are (the Λ mask without a distance limit)
            visible[starting] |= far
    batch, heads = query.shape[:2]
    kv_heads, groups = key.shape[1], query.shape[1] // key.shape[1]
    stacked = query.reshape(batch, kv_heads, groups, query.shape[-1])  # a key head's query heads as rows
    if softcap is None:
        mask = visible.view(1, 1, 1, -1)
        out = scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scale)
    else:  # soft-capped logits (Gemma 2) are not an SDPA: written out in float32
        logits = explicit_logits(query, key, scale, softcap).masked_fill(~visible, NEG_INF)
        probs = torch.softmax(logits, dim=-1).view(batch, kv_heads, groups, -1)
        out = probs @ value.float()
    return out.view(batch, heads, 1, value.shape[-1]).transpose(1, 2).to(query.dtype)
