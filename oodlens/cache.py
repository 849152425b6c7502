"""A bounded decoding cache: the starting tokens plus the last window of keys, per layer.

Memory per layer is constant in the generated length: ``n_global + n_local - 1`` keys are kept between steps
(the next query needs the ``n_local - 1`` keys before it, plus the starting tokens). Keys stay rotated at
their absolute positions, as transformers stores them; the cache tells the engine where the keys it returned
sit (:meth:`BoundedCache.key_layout`), so it knows where the starting tokens end and the tail begins.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import KeyLayout


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
        layout = KeyLayout(n_global=stored_global if stored_global < keys.shape[-2] else 0, total=self.total)
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

    def key_layout(self, layer_idx: int, key: torch.Tensor) -> KeyLayout | None:
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
        if isinstance(layer, BoundedLayer):
            layer.update(source.keys, source.values)
        else:
            cache.layers[index] = copy.deepcopy(source)
    return cache
