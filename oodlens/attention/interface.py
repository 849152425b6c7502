"""The function registered with transformers' ``AttentionInterface`` (and a compact mask function with
``AttentionMaskInterface``), and the bindings that tell it each module's plan, observer and caches.

Every model family that calls the attention interface runs through the engine without a patched model class.
transformers hands over query ``[B, Hq, Q, D]`` and key/value ``[B, Hkv, K, D]`` already rotated at their
absolute positions, after the cache update, GQA not repeated; the output is ``[B, Q, Hq, D]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..errors import OodlensError
from .blockwise import RowGroup, attend_group
from .plan import AttentionObserver, KeyLayout, KeySource, LayerPlan, SlotLayout
from .slots import attend_slots

ATTENTION_NAME = "oodlens"


@dataclass
class Binding:
    """What the engine needs to know about one attention module.

    ``caches``: the bounded caches made for this module's policy, which say where the keys they return sit.
    """

    plan: LayerPlan
    observer: AttentionObserver | None = None
    block_size: int | None = None
    caches: weakref.WeakSet[KeySource] = field(default_factory=weakref.WeakSet)


_BINDINGS: weakref.WeakKeyDictionary[nn.Module, Binding] = weakref.WeakKeyDictionary()


def bind(module: nn.Module, binding: Binding) -> None:
    """Route ``module``'s attention through the engine with ``binding``."""
    _BINDINGS[module] = binding


def unbind(module: nn.Module) -> None:
    _BINDINGS.pop(module, None)


def binding_of(module: nn.Module) -> Binding | None:
    return _BINDINGS.get(module)


def _layout(binding: Binding | None, layer_idx: int, key: torch.Tensor) -> KeyLayout | SlotLayout | None:
    """Where the keys sit, if one of the module's bounded caches returned them (None: a plain cache)."""
    if binding is None:
        return None
    return next(
        (found for cache in binding.caches if (found := cache.key_layout(layer_idx, key)) is not None), None
    )


def _key_positions(key: torch.Tensor, total: int, layout: KeyLayout | None) -> torch.Tensor:
    """Absolute positions ``[K]`` of the keys, for full, sliding (tail only) and bounded (head + tail)
    caches."""
    n_keys = key.shape[-2]
    n_global = layout.n_global if layout is not None else 0
    if layout is not None:
        total = layout.total
    if n_keys > total:
        raise OodlensError(
            f"got {n_keys} keys for {total} tokens: transformers' static caches are not supported; use the "
            "default dynamic cache, or oodlens' bounded cache (static=True for a preallocated one)"
        )
    positions = torch.arange(n_keys, device=key.device)
    positions[n_global:] += total - n_keys
    return positions


def _layer_plan(binding: Binding | None, sliding_window: int | None) -> LayerPlan:
    """The model's own sliding-window layers keep their trained behaviour; the policy applies to full
    layers."""
    plan = binding.plan if binding is not None else LayerPlan()
    if sliding_window is not None:
        return LayerPlan(window=sliding_window, rotary=plan.rotary)
    return plan


def _refuse_unsupported(module: nn.Module, dropout: float, kwargs: dict) -> None:
    if dropout and module.training:
        raise OodlensError("oodlens attention is for inference: call model.eval() before running it")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise OodlensError(
            f"{type(module).__name__} uses learned attention sinks, which oodlens does not support"
        )


def _row_groups(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    layout: KeyLayout | None,
) -> Iterator[tuple[slice, torch.Tensor | None, RowGroup]]:
    """The batch rows that share positions, as ``(rows, queries kept or None, group)``: all rows at once
    without padding, else each left-padded row with its padding cut off (positions counted from its first
    real token)."""
    batch, n_queries = query.shape[0], query.shape[2]
    if padding is not None:
        total = padding.shape[-1]
    elif position_ids is not None:
        total = int(position_ids[:, -1].max()) + 1
    else:
        total = key.shape[-2]
    k_abs = _key_positions(key, total, layout)
    q_abs = torch.arange(total - n_queries, total, device=query.device)

    def rotation_offset(row: int, pad: int) -> int:
        if position_ids is None:
            return pad
        return int(position_ids[min(row, position_ids.shape[0] - 1), -1]) - (total - 1 - pad)

    if padding is None:
        if position_ids is not None and batch > 1 and not (position_ids == position_ids[:1]).all():
            raise OodlensError(
                "rows with different position_ids need an attention_mask that marks their padding"
            )
        yield slice(0, batch), None, RowGroup(query, key, value, q_abs, k_abs, rotation_offset(0, 0))
        return
    for row in range(batch):
        valid = padding[row].bool()
        pad = int((~valid).cumprod(0).sum())
        if not bool(valid[pad:].all()):
            raise OodlensError("only left padding is supported (padding found between real tokens)")
        keep_k, keep_q = k_abs >= pad, q_abs >= pad
        if bool(keep_q.any()):
            rows = slice(row, row + 1)
            group = RowGroup(
                query[rows][:, :, keep_q],
                key[rows][:, :, keep_k],
                value[rows][:, :, keep_k],
                q_abs[keep_q] - pad,
                k_abs[keep_k] - pad,
                rotation_offset(row, pad),
            )
            yield rows, keep_q, group


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
    """Attention through the bound policy and observer (see the package docstring);
    ``([B, Q, Hq, D], None)``."""
    _refuse_unsupported(module, dropout, kwargs)
    binding = binding_of(module)
    layer_idx = getattr(module, "layer_idx", 0) or 0
    plan = _layer_plan(
        binding, sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    )
    observer = binding.observer if binding is not None else None
    block_size = binding.block_size if binding is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    padding = (
        attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    )
    layout = _layout(binding, layer_idx, key)
    if isinstance(layout, SlotLayout):
        if observer is not None or padding is not None:
            raise OodlensError(
                "a static bounded cache decodes unpadded batches without observers: run oodlens.capture on "
                "a forward over the sequence, and decode a left-padded batch with the dynamic bounded cache "
                "(static=False)"
            )
        return attend_slots(plan, query, key, value, layout, scale, softcap, position_ids), None
    groups = _row_groups(query, key, value, padding, position_ids, layout)
    if padding is None:
        ((_, _, group),) = groups
        return attend_group(plan, group, scale, softcap, observer, layer_idx, block_size).contiguous(), None
    batch, heads, n_queries, dim = query.shape
    output = torch.zeros(batch, n_queries, heads, dim, dtype=query.dtype, device=query.device)
    for rows, keep_q, group in groups:
        output[rows, keep_q] = attend_group(plan, group, scale, softcap, observer, layer_idx, block_size)
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
