"""The :class:`Policy` type: a model-independent description of which keys each query sees and at which
positions the query and each key are rotated, and the one answer to "can this policy decode with a bounded
cache".

Every method is a :class:`Policy` made by a function of its own (``lm_infinite()``, ``streaming_llm()``, …)
that records the method's settings, some of which default from the model's pretraining length L;
:meth:`Policy.resolve` turns them into the general fields (band, far keys, position maps, query scale, chunks,
RoPE parameters) with the rule the method's module registered in :data:`RESOLVERS`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..attention import IDENTITY, ChunkPlan, LayerPlan, PositionMap, QueryScale, fixed
from ..errors import OodlensError, check_count, check_train_length
from ..rope import RotarySpec

EVERY_KEY = sys.maxsize  # n_global that makes every key beyond the window a far key
Settings = tuple[tuple[str, Any], ...]
# method → the rule that fills a policy's general fields from its settings and the pretraining length
RESOLVERS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {}


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
    """An attention policy: a method's settings and, once resolved against a pretraining length, the general
    rule the engine runs.

    Attributes:
        name: label used in reports.
        method: the method whose rule (in :data:`RESOLVERS`) fills the fields below from ``settings``; None
            for a policy given directly by its fields.
        settings: the method's own parameters as the user gave them (``None``: the method's default from L).
        window: local band: keys with ``i − j < window`` at their true positions; ``None`` = every key.
        n_global: keys ``j < n_global`` stay visible beyond the window (:data:`EVERY_KEY`: all of them).
        distance_limit: far keys unrotated (position 0) and queries at this position (LM-Infinite, ReRoPE).
        far_query, far_key: position maps of far queries and keys otherwise (true positions by default).
        query_scale: a factor on each query's logits (ReRoPE's and Self-Extend's log scaling, STRING, DCA).
        chunk: dual chunk attention instead of a band.
        rope_parameters: new ``rope_parameters`` for the model's rotary embedding (PI, NTK, YaRN, …).
        top_k: extra middle keys per head (LM-Infinite's optional top-k), in layers ``≥ top_k_from_layer``,
            seen at ``distance_limit // 2``.
    """

    name: str = "vanilla"
    method: str | None = None
    settings: Settings = ()
    window: int | None = None
    n_global: int = 0
    distance_limit: int | None = None
    far_query: PositionMap = IDENTITY
    far_key: PositionMap = IDENTITY
    query_scale: QueryScale | None = None
    chunk: ChunkPlan | None = None
    rope_parameters: Settings | None = None
    top_k: int = 0
    top_k_from_layer: int = 4
    resolved_for: int | None = field(default=None, compare=False)

    def setting(self, key: str) -> Any:
        """One of the method's settings as given (None when left to its default)."""
        return dict(self.settings).get(key)

    def resolve(self, train_length: int) -> Policy:
        """The general rule for a model pretrained at ``train_length`` (defaults filled, values checked)."""
        check_train_length(train_length)
        if self.method is None or self.resolved_for == train_length:
            return self
        fields_ = RESOLVERS[self.method](dict(self.settings), train_length)
        return replace(self, **fields_, resolved_for=train_length)

    def layer_plan(self, layer_idx: int, rotary: RotarySpec | None) -> LayerPlan:
        """What the engine runs in attention layer ``layer_idx`` (a resolved policy)."""
        use_top_k = self.top_k > 0 and layer_idx >= self.top_k_from_layer
        far_query, far_key = self.far_query, self.far_key
        if self.distance_limit is not None:
            far_query, far_key = fixed(self.distance_limit), fixed(0.0)
        return LayerPlan(
            window=self.window,
            n_global=self.n_global if self.window is not None else 0,
            far_query=far_query,
            far_key=far_key,
            top_k=self.top_k if use_top_k else 0,
            top_k_distance=(self.distance_limit // 2) if use_top_k else None,
            query_scale=self.query_scale,
            chunk=self.chunk,
            rotary=rotary,
        )

    def runs_in_pieces(self, train_length: int) -> bool:
        """Whether a sequence run in pieces through a cache gives what one call over it gives. Not for DCA's
        logit factor, which depends on the length of each call, nor for RoPE rescaling that picks its
        frequencies from each call's length (transformers' "dynamic" and "longrope")."""
        p = self.resolve(train_length)
        if p.query_scale is not None and p.query_scale.length_coefficient is not None:
            return False
        rope_type = dict(p.rope_parameters or ()).get("rope_type")
        return rope_type not in ("dynamic", "longrope")

    def vanilla_prefix(self, train_length: int) -> int:
        """How many leading positions this policy attends exactly as vanilla does (0 when its rule differs
        from the first token: rescaled RoPE, a constant logit factor, DCA's length-dependent factor);
        :data:`EVERY_KEY` for one that never differs."""
        p = self.resolve(train_length)
        prefix = EVERY_KEY if p.window is None else p.window
        if p.chunk is not None:  # below the cap every chunk's query sits at its true position
            prefix = min(prefix, p.chunk.cap, 2 * p.chunk.chunk)
        scale = p.query_scale
        if scale is not None:
            if scale.constant != 1.0 or scale.length_coefficient is not None:
                prefix = 0
            elif scale.log_base is not None:
                prefix = min(prefix, int(scale.log_base))  # max(1, ln(i + 1) / ln base) is 1 for i < base
        if p.rope_parameters is not None:
            prefix = 0
        return prefix

    def cache_plan(self, train_length: int) -> CachePlan:
        """Whether this policy decodes in constant memory, and with which bounded cache (see
        :class:`CachePlan`).

        Bounded: a window with only the first ``n_global`` tokens visible beyond it (a plain window, the Λ
        mask, LM-Infinite, StreamingLLM). Unbounded: no window (vanilla, RoPE rescaling), every key visible
        beyond it (the distance limit, ReRoPE, Self-Extend, STRING, DCA), or top-k over the middle tokens,
        which must all stay available.
        """
        p = self.resolve(train_length)
        if p.chunk is not None:
            return CachePlan(False, reason=f"{p.name} attends to every earlier chunk")
        if p.window is None:
            return CachePlan(False, reason=f"{p.name} attends to every earlier key (no window)")
        if p.n_global >= EVERY_KEY:
            return CachePlan(
                False, reason=f"{p.name} sees every key beyond its window (at rewritten positions)"
            )
        if p.top_k > 0:
            return CachePlan(False, reason=f"{p.name} picks top-{p.top_k} middle keys from the whole history")
        return CachePlan(True, n_global=p.n_global, window=p.window)

    def describe(self, train_length: int) -> str:
        """One line: which keys a query sees and where they sit, every length resolved against
        ``train_length``."""
        p = self.resolve(train_length)
        if p.chunk is not None:
            keys = f"every earlier key, in chunks of {p.chunk.chunk} (no distance beyond {p.chunk.cap})"
        elif p.window is None or p.n_global >= EVERY_KEY:
            keys = "every earlier key" + ("" if p.window is None else f", true distances within {p.window}")
        elif p.n_global:
            keys = f"the first {p.n_global} tokens and the last {p.window} keys"
        else:
            keys = f"the last {p.window} keys"
        if p.distance_limit is not None:
            where = f"distances capped at {p.distance_limit}"
        elif (
            p.window is not None and p.n_global and (not p.far_query.is_identity or not p.far_key.is_identity)
        ):
            where = "far keys at rewritten positions"
        elif p.rope_parameters is not None:
            where = "RoPE rebuilt with " + ", ".join(f"{k}={v}" for k, v in p.rope_parameters)
        else:
            where = "true distances"
        extras = [f"top-{p.top_k} middle keys"] if p.top_k else []
        if p.query_scale is not None:
            extras.append("scaled logits")
        return f"{p.name}: {keys}; {where}" + "".join(f", {extra}" for extra in extras)

    @property
    def rewrites_positions(self) -> bool:
        """Whether the engine re-rotates queries or keys (and so needs the model's rotary frequencies)."""
        return (
            self.distance_limit is not None
            or self.top_k > 0
            or self.chunk is not None
            or not (self.far_query.is_identity and self.far_key.is_identity)
        )


def settings_of(**values: Any) -> Settings:
    """A method's settings in the frozen form a :class:`Policy` keeps."""
    return tuple(values.items())


def tokens(label: str, value: Any, *, upto: int | None = None, what: str = "the pretraining length") -> int:
    """``value`` if it is a whole number of tokens ≥ 1 (and ≤ ``upto``), else a one-line error naming the
    fix."""
    check_count(label, value, minimum=1)
    if upto is not None and value > upto:
        raise OodlensError(f"{label} {value} exceeds {what} ({upto}): use at most {upto}")
    return value


def or_length(value: Any, default: int) -> Any:
    """A length setting, or its default where it was left unset (``None``; 0 stays 0 and is refused)."""
    return default if value is None else value
