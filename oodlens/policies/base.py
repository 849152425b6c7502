"""The :class:`Policy` type: a model-independent description of which keys each query sees and at what
distance, and the one answer to "can this policy decode with a bounded cache"."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from ..attention import LayerPlan
from ..errors import OodlensError, check_train_length
from ..rope import RotarySpec

EVERY_KEY = sys.maxsize  # n_global that makes every key beyond the window a far key (distance limit only)


@dataclass(frozen=True)
class CachePlan:
    """How a resolved policy decodes: with a bounded cache of ``n_global`` starting and ``window`` recent
    tokens per layer (``bounded``), or with the whole history (``reason`` says why)."""

    bounded: bool
    n_global: int = 0
    window: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    """A model-independent description of an attention policy.

    ``None`` lengths are filled with the model's pretraining length by :meth:`resolve`.

    Attributes:
        name: label used in reports.
        window: local band width (keys with ``i − j < window`` use true RoPE); ``None`` = unlimited.
        n_global: starting tokens that stay visible beyond the window.
        distance_limit: far keys are seen at this distance; ``None`` keeps their true distance.
        top_k: extra middle keys per head (LM-Infinite's optional top-k), in layers ``≥ top_k_from_layer``.
        top_k_from_layer: first layer that uses top-k.
        limited: whether ``distance_limit`` applies (``distance_limit=None`` then means "the training length").
        windowed: whether ``window`` applies (``window=None`` then means "the training length").
    """

    name: str = "vanilla"
    window: int | None = None
    n_global: int = 0
    distance_limit: int | None = None
    top_k: int = 0
    top_k_from_layer: int = 4
    limited: bool = False
    windowed: bool = False

    def resolve(self, train_length: int) -> Policy:
        """Fill unset lengths with ``train_length`` and validate."""
        check_train_length(train_length)
        window = self.window if self.window is not None or not self.windowed else train_length
        limit = self.distance_limit if self.distance_limit is not None or not self.limited else train_length
        resolved = replace(self, window=window, distance_limit=limit)
        for label, value in (
            ("n_local/window", resolved.window),
            ("distance_limit", resolved.distance_limit),
        ):
            if value is not None and value <= 0:
                raise OodlensError(f"{label} must be a positive number of tokens, got {value}")
        if resolved.n_global < 0 or resolved.top_k < 0:
            raise OodlensError("n_global and top_k must be ≥ 0")
        if resolved.top_k > 0 and resolved.distance_limit is None:
            raise OodlensError("top_k needs a distance limit (the top-k keys sit at distance_limit // 2)")
        return resolved

    def layer_plan(self, layer_idx: int, rotary: RotarySpec | None) -> LayerPlan:
        use_top_k = self.top_k > 0 and layer_idx >= self.top_k_from_layer
        return LayerPlan(
            window=self.window,
            n_global=self.n_global if self.window is not None else 0,
            far_distance=self.distance_limit,
            top_k=self.top_k if use_top_k else 0,
            top_k_distance=(self.distance_limit // 2) if use_top_k else None,
            rotary=rotary,
        )

    def vanilla_prefix(self, train_length: int) -> int:
        """How many leading positions this policy attends exactly as vanilla does: below its window every
        query sees every earlier key at its true distance (the distance limit and top-k act only on keys
        beyond the window). :data:`EVERY_KEY` for a policy without a window, which never differs from
        vanilla."""
        resolved = self.resolve(train_length)
        return EVERY_KEY if resolved.window is None else resolved.window

    def cache_plan(self, train_length: int) -> CachePlan:
        """Whether this policy decodes in constant memory, and with which bounded cache (see :class:`CachePlan`).

        Bounded: a window with only the first ``n_global`` tokens visible beyond it (a plain window, the Λ
        mask, LM-Infinite). Unbounded: no window (vanilla), every key visible beyond it (the distance limit
        alone), or top-k over the middle tokens, which must all stay available.
        """
        p = self.resolve(train_length)
        if p.window is None:
            return CachePlan(False, reason=f"{p.name} attends to every earlier key (no window)")
        if p.n_global >= EVERY_KEY:
            return CachePlan(
                False, reason=f"{p.name} sees every key beyond its window (at a capped distance)"
            )
        if p.top_k > 0:
            return CachePlan(False, reason=f"{p.name} picks top-{p.top_k} middle keys from the whole history")
        return CachePlan(True, n_global=p.n_global, window=p.window)

    def describe(self, train_length: int) -> str:
        """One line: which keys a query sees and at what distance, every length resolved against
        ``train_length``."""
        p = self.resolve(train_length)
        if p.window is None or p.n_global >= EVERY_KEY:
            keys = "every earlier key"
        elif p.n_global:
            keys = f"the first {p.n_global} tokens and the last {p.window} keys"
        else:
            keys = f"the last {p.window} keys"
        distance = "true distances" if p.distance_limit is None else f"distances capped at {p.distance_limit}"
        return f"{p.name}: {keys}, {distance}" + (f", top-{p.top_k} middle keys" if p.top_k else "")

    @property
    def rewrites_distance(self) -> bool:
        return self.limited or self.top_k > 0
