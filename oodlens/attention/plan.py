"""What the engine is told: the rules of one layer (:class:`LayerPlan`), what observers receive
(:class:`BlockStats`), and where cached keys sit (:class:`KeyLayout`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..rope import RotarySpec


@dataclass(frozen=True)
class PositionMap:
    """Where a query or key at true position ``x`` is rotated: ``min(cap, scale · ⌊(x mod modulo) / group⌋ +
    offset)`` (``modulo`` and ``cap`` off when None). Every method's rule is a few of these (docs/methods.md):
    LM-Infinite's far keys sit at 0 and its queries at L (``scale=0``), Self-Extend groups positions by G,
    Leaky ReRoPE scales them by 1/k, StreamingLLM caps the query at S + R − 1, DCA takes keys modulo the
    chunk. Positions may be fractional."""

    scale: float = 1.0
    offset: float = 0.0
    group: int = 1
    modulo: int | None = None
    cap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Positions ``[…]`` (float64, exact for any length) of true positions ``x [...]``."""
        position = x.double()
        if self.modulo is not None:
            position = torch.remainder(position, self.modulo)
        if self.group != 1:
            position = torch.div(position, self.group, rounding_mode="floor")
        position = position * self.scale + self.offset
        return position if self.cap is None else position.clamp(max=self.cap)


IDENTITY = PositionMap()


def fixed(position: float) -> PositionMap:
    """Every query (or key) at the same ``position``."""
    return PositionMap(scale=0.0, offset=position)


@dataclass(frozen=True)
class QueryScale:
    """A factor on each query's logits (its vector is multiplied by it, before any soft-cap).

    ``constant`` always; times ``max(1, ln(i + 1) / ln(log_base))`` for the query at true position ``i`` when
    ``log_base`` is set (ReRoPE, Self-Extend's option); times
    ``(length_coefficient · ln(n / train_length) + 1)²`` when the call holds ``n > train_length`` tokens
    (DCA)."""

    constant: float = 1.0
    log_base: float | None = None
    length_coefficient: float | None = None
    train_length: int | None = None

    def factors(self, positions: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The factor ``[Q]`` (float32) of queries at true positions ``[Q]`` in a call over ``n_tokens``."""
        factor = torch.full(
            positions.shape, float(self.constant), dtype=torch.float64, device=positions.device
        )
        if self.log_base is not None:
            factor = factor * (torch.log(positions.double() + 1) / math.log(self.log_base)).clamp(min=1.0)
        if self.length_coefficient is not None and n_tokens > self.train_length:
            factor = factor * (self.length_coefficient * math.log(n_tokens / self.train_length) + 1) ** 2
        return factor.float()


@dataclass(frozen=True)
class ChunkPlan:
    """Dual chunk attention (DCA): keys sit at ``j mod chunk``; a query sees keys of its own chunk at their
    true distance, the previous chunk from ``min(i mod chunk + chunk, cap)`` and older chunks from
    ``min(2 · chunk − 1, cap)``, so no distance exceeds ``cap`` (ChunkLlama's ``chunk_size − local_window``
    and ``chunk_size``)."""

    chunk: int
    cap: int

    def query_maps(self) -> tuple[PositionMap, PositionMap]:
        """The query's position for keys of the previous chunk and of older chunks."""
        previous = PositionMap(modulo=self.chunk, offset=self.chunk, cap=self.cap)
        return previous, fixed(min(2 * self.chunk - 1, self.cap))

    def key_map(self) -> PositionMap:
        return PositionMap(modulo=self.chunk)


@dataclass(frozen=True)
class LayerPlan:
    """The resolved rules for one attention layer: which keys each query sees, where each is rotated.

    Attributes:
        window: keys with ``i - j < window`` are local, at their true positions; ``None`` means every key.
        n_global: keys with real position ``j < n_global`` stay visible beyond the window ("far" keys); a huge
            number makes every key beyond the window a far key.
        far_query, far_key: where a query and a far key are rotated for their logit (true positions by
            default).
        top_k: number of extra middle keys per query and head (0: none), LM-Infinite's option.
        top_k_distance: distance at which the top-k middle keys are seen.
        query_scale: a factor on each query's logits, or None.
        chunk: dual chunk attention instead of a band (``window`` and the far rule are then unused).
        rotary: how this layer rotates; needed whenever a position is rewritten.
    """

    window: int | None = None
    n_global: int = 0
    far_query: PositionMap = IDENTITY
    far_key: PositionMap = IDENTITY
    top_k: int = 0
    top_k_distance: int | None = None
    query_scale: QueryScale | None = None
    chunk: ChunkPlan | None = None
    rotary: RotarySpec | None = None

    @property
    def is_vanilla(self) -> bool:
        return self.window is None and self.top_k == 0 and self.chunk is None and self.query_scale is None

    @property
    def moves_far_keys(self) -> bool:
        """Whether far keys are seen anywhere but at their true positions."""
        return not (self.far_query.is_identity and self.far_key.is_identity)


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
        dtype: the dtype the model computes attention in (the statistics themselves are float32).
    """

    query_positions: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor | None
    sampled_positions: torch.Tensor
    sampled_logits: torch.Tensor | None
    sampled_distances: torch.Tensor | None
    dtype: torch.dtype = torch.float32


class AttentionObserver(Protocol):
    """Receives :class:`BlockStats`; implemented by :mod:`oodlens.capture`."""

    n_global: int  # the starting tokens whose attention mass is the sink mass

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices into ``positions`` (``[C]``) whose full logit rows the observer wants (may be empty)."""

    def observe(self, layer_idx: int, stats: BlockStats) -> None:
        """Reduce one block's statistics; must not keep references to large tensors."""


@dataclass(frozen=True)
class KeyLayout:
    """Keys ``[0, n_global)`` are the first tokens; the rest are the contiguous tail ending at
    ``total - 1``."""

    n_global: int
    total: int


@dataclass(frozen=True)
class SlotLayout:
    """Keys in fixed slots written in place (a static bounded cache during decoding): slot ``s`` holds the key
    at true position ``positions[s]`` (-1 while empty), and the one query sits at ``query_position``. Both
    stay on the device, so a step that reads them needs no synchronisation. The first ``scratch`` slots hold
    no key of their own: the attention writes the starting tokens' keys there, moved to their far
    positions (the starting tokens themselves follow in the next ``scratch`` slots)."""

    positions: torch.Tensor
    query_position: torch.Tensor
    scratch: int


class KeySource(Protocol):
    """A cache that drops keys (see :mod:`oodlens.cache`) and can say where the keys it returned sit."""

    def key_layout(self, layer_idx: int, key: torch.Tensor) -> KeyLayout | SlotLayout | None:
        """The layout of ``key`` if this cache returned it for layer ``layer_idx``, else None."""
