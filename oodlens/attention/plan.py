"""What the engine is told: the rules of one layer (:class:`LayerPlan`), what observers receive
(:class:`BlockStats`), and where cached keys sit (:class:`KeyLayout`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..rope import RotarySpec


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
        sink_mass: ``[B, H, C]`` probability mass on keys at real positions ``< observer.n_global``.
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

    n_global: int  # the starting tokens whose attention mass is the sink mass

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices into ``positions`` (``[C]``) whose full logit rows the observer wants (may be empty)."""

    def observe(self, layer_idx: int, stats: BlockStats) -> None:
        """Reduce one block's statistics; must not keep references to large tensors."""


@dataclass(frozen=True)
class KeyLayout:
    """Keys ``[0, n_global)`` are the first tokens; the rest are the contiguous tail ending at ``total - 1``."""

    n_global: int
    total: int


class KeySource(Protocol):
    """A cache that drops keys (see :mod:`oodlens.cache`) and can say where the keys it returned sit."""

    def key_layout(self, layer_idx: int, key: torch.Tensor) -> KeyLayout | None:
        """The layout of ``key`` if this cache returned it for layer ``layer_idx``, else None."""
