"""A bounded decoding cache: the starting tokens plus the last window of keys, per layer.

Memory per layer is constant in the generated length: ``n_global + n_local - 1`` keys are kept between steps
(the next query needs the ``n_local - 1`` keys before it, plus the starting tokens). Keys stay rotated at
their absolute positions, as transformers stores them; the cache tells the engine where the keys it returned
sit (:meth:`BoundedCache.key_layout`), so it knows where the starting tokens end and the tail begins.

:class:`StaticBoundedCache` keeps the same keys in slots allocated once and written in place, so that a
decoding step costs no host synchronisation and can be captured as a CUDA graph.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import KeyLayout, SlotLayout
from .errors import OodlensError


def _returned_layout(stored_global: int, keys: torch.Tensor, total: int) -> KeyLayout:
    """Where the keys a bounded layer returns sit: the ``stored_global`` starting tokens it held, then a
    contiguous tail ending at ``total - 1`` (when every key returned is a starting token, they are that
    contiguous tail as well)."""
    return KeyLayout(n_global=stored_global if stored_global < keys.shape[-2] else 0, total=total)


class BoundedLayer(DynamicLayer):
    """One layer of :class:`BoundedCache`."""

    _layer_type = None  # keep transformers' layer registry untouched

    def __init__(self, n_global: int, n_local: int):
        super().__init__()
        self.n_global = n_global
        self.n_local = n_local
        self.total = 0
        self.returned: tuple[int, tuple[int, ...], KeyLayout] | None = None  # data_ptr, shape and layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, Q, D]`` states; return every key the new queries may need, then trim the store."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        stored_global = min(self.n_global, self.total)
        self.total += key_states.shape[-2]
        layout = _returned_layout(stored_global, keys, self.total)
        self.returned = (keys.data_ptr(), tuple(keys.shape), layout)
        keep_tail = self.n_local - 1
        n_global = min(self.n_global, self.total)
        if keys.shape[-2] > n_global + keep_tail:
            self.keys = (
                torch.cat([keys[:, :, :n_global], keys[:, :, -keep_tail:]], dim=-2)
                if keep_tail
                else keys[:, :, :n_global]
            )
            self.values = (
                torch.cat([values[:, :, :n_global], values[:, :, -keep_tail:]], dim=-2)
                if keep_tail
                else values[:, :, :n_global]
            )
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a bounded cache cannot be cropped: it has dropped old keys")


class BoundedCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers keep only ``n_global`` starting and ``n_local - 1`` recent
    keys. The model's own sliding-window layers keep transformers' sliding cache."""

    def __init__(self, config, n_global: int, n_local: int):
        super().__init__(config=config)
        self.layers = [
            BoundedLayer(n_global, n_local) if type(layer) is DynamicLayer else layer for layer in self.layers
        ]

    def key_layout(self, layer_idx: int, key: torch.Tensor) -> KeyLayout | SlotLayout | None:
        """Where the keys ``key`` sit, if this cache's layer ``layer_idx`` returned them by its last
        update."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        returned = getattr(layer, "returned", None)
        if returned is None or returned[:2] != (key.data_ptr(), tuple(key.shape)):
            return None
        return returned[2]

    def stored_tokens(self) -> list[int]:
        """Keys held per layer (for memory checks)."""
        return [0 if layer.keys is None else layer.keys.shape[-2] for layer in self.layers]


class StaticBoundedLayer(DynamicLayer):
    """One layer of :class:`StaticBoundedCache`, allocated once and written in place: ``n_global`` scratch
    slots where the attention puts the starting tokens' keys moved to their far positions, ``n_global`` slots
    for the starting tokens (position j in slot ``n_global + j``) and a ring of ``n_local`` slots for the
    last keys (position p in slot ``2 n_global + (p - n_global) mod n_local``)."""

    _layer_type = None  # keep transformers' layer registry untouched

    def __init__(self, n_global: int, n_local: int):
        super().__init__()
        self.n_global = n_global
        self.n_local = n_local
        self.returned: tuple[int, tuple[int, ...], KeyLayout | SlotLayout] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        slots = 2 * self.n_global + self.n_local
        self.device = key_states.device
        self.keys = key_states.new_zeros(batch, heads, slots, dim)
        self.values = value_states.new_zeros(batch, heads, slots, value_states.shape[-1])
        self.slot_positions = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        # tokens written so far, on the device: a captured step advances it without the host
        self.written = torch.zeros((), dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """One new token: write its slot and return every slot (a :class:`SlotLayout`, no host read). Several
        (a prefill): return the kept keys in position order and the new ones (a :class:`KeyLayout`), then
        write the starting tokens and the last ``n_local`` of them into their slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            return self._write_one(key_states, value_states)
        total = int(self.written)
        held = self._positions_held(total)
        slots = torch.tensor([self._slot(p) for p in held], dtype=torch.long, device=self.device)
        keys = torch.cat([self.keys.index_select(2, slots), key_states], dim=-2)
        values = torch.cat([self.values.index_select(2, slots), value_states], dim=-2)
        new_total = total + key_states.shape[-2]
        layout = _returned_layout(min(self.n_global, total), keys, new_total)
        self.returned = (keys.data_ptr(), tuple(keys.shape), layout)
        kept = [p for p in self._positions_held(new_total) if p >= total]
        index = torch.tensor([p - total for p in kept], dtype=torch.long, device=self.device)
        slots = torch.tensor([self._slot(p) for p in kept], dtype=torch.long, device=self.device)
        self.keys.index_copy_(2, slots, key_states.index_select(2, index))
        self.values.index_copy_(2, slots, value_states.index_select(2, index))
        self.slot_positions.index_copy_(0, slots, torch.tensor(kept, dtype=torch.long, device=self.device))
        self.written.fill_(new_total)
        return keys, values

    def _write_one(self, key_states: torch.Tensor, value_states: torch.Tensor):
        position = self.written.clone()
        ring = 2 * self.n_global + (position - self.n_global).remainder(self.n_local)
        slot = torch.where(position < self.n_global, self.n_global + position, ring).view(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.slot_positions.index_copy_(0, slot, position.view(1))
        self.written.add_(1)
        layout = SlotLayout(self.slot_positions, position, scratch=self.n_global)
        self.returned = (self.keys.data_ptr(), tuple(self.keys.shape), layout)
        return self.keys, self.values

    def _slot(self, position: int) -> int:
        if position < self.n_global:
            return self.n_global + position
        return 2 * self.n_global + (position - self.n_global) % self.n_local

    def _positions_held(self, total: int) -> list[int]:
        """The positions the slots hold after ``total`` tokens, in order: starting tokens, then the ring."""
        starting = list(range(min(self.n_global, total)))
        return starting + list(range(max(self.n_global, total - self.n_local), total))

    def get_seq_length(self) -> torch.Tensor | int:
        """The tokens written, as the live device counter (transformers' StaticLayer does the same: its
        masking code asks at every step, and a read back would stall a captured one); copy it to keep it."""
        return self.written if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # an upper bound that needs no read of the device counter (oodlens' mask function only passes
        # the padding on)
        slots = self.keys.shape[-2] if self.is_initialized else 0
        return slots + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a bounded cache cannot be cropped: it has dropped old keys")


class StaticBoundedCache(BoundedCache):
    """A bounded cache preallocated and written in place: the starting tokens and a ring of the last
    ``n_local`` keys per full-attention layer, a ring of the model's window for its own sliding-window layers.
    A one-token step reads no value back to the host and keeps every shape, so it can be captured as a CUDA
    graph (see :func:`oodlens.evaluate.decode_speed`); left padding and observers need the dynamic
    :class:`BoundedCache`."""

    def __init__(self, config, n_global: int, n_local: int):
        DynamicCache.__init__(self, config=config)
        self.layers = [_static_layer(layer, n_global, n_local) for layer in self.layers]


def _static_layer(layer: DynamicLayer, n_global: int, n_local: int) -> StaticBoundedLayer:
    if type(layer) is DynamicLayer:
        return StaticBoundedLayer(n_global, n_local)
    window = getattr(layer, "sliding_window", None)
    if window is None:
        raise OodlensError(f"a static bounded cache cannot stand in for transformers' {type(layer).__name__}")
    return StaticBoundedLayer(0, window)


def continue_from(prefix: DynamicCache, cache: DynamicCache) -> DynamicCache:
    """Fill the empty ``cache`` with the state of ``prefix`` (a cache after the first tokens of a sequence),
    which stays untouched, so that several methods can each continue one computed prefix.

    A bounded layer takes the prefix's keys as if they had just been appended (it keeps the starting tokens
    and the last window); every other layer, the model's own sliding-window layers included, gets a copy of
    the prefix's layer. Both caches must come from the same model config.
    """
    if len(cache.layers) != len(prefix.layers):
        raise ValueError(f"a cache of {len(prefix.layers)} layers cannot seed one of {len(cache.layers)}")
    for index, (layer, source) in enumerate(zip(cache.layers, prefix.layers, strict=True)):
        if not source.is_initialized:
            continue
        if isinstance(layer, (BoundedLayer, StaticBoundedLayer)):
            if source.get_seq_length() != source.keys.shape[-2]:
                raise OodlensError("a bounded cache continues only a prefix that holds all its keys")
            layer.update(source.keys, source.values)
        else:
            cache.layers[index] = copy.deepcopy(source)
    return cache
