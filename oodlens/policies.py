"""Attention policies: which keys each query sees, and at what distance.

Every method oodlens runs is the same blockwise attention (:mod:`oodlens.attention`) with another answer to
those two questions:

=================  ====================================  =====================================
policy             keys query i sees                     distance used
=================  ====================================  =====================================
vanilla            all j ≤ i                             i − j
window             i − j < W                             i − j
lambda             j < G or i − j < W                    i − j
distance-limit     all j ≤ i                             min(i − j, L)  (ReRoPE-like)
lm-infinite        j < G or i − j < W                    i − j locally, L for far starting keys
=================  ====================================  =====================================

``apply_policy`` (and its shorthand ``apply_lm_infinite``) returns a :class:`PolicyHandle`, also a context
manager, whose ``remove()`` restores the model's previous attention implementation exactly.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace

from torch import nn

from . import attention
from .errors import OodlensError
from .rope import rotary_spec_for

EVERY_KEY = sys.maxsize  # n_global that makes every key beyond the window a far key (distance limit only)


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

    def layer_plan(self, layer_idx: int, rotary) -> attention.LayerPlan:
        use_top_k = self.top_k > 0 and layer_idx >= self.top_k_from_layer
        return attention.LayerPlan(
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

    @property
    def rewrites_distance(self) -> bool:
        return self.limited or self.top_k > 0


def vanilla() -> Policy:
    """Full causal attention (the model as trained); still routed through the engine so it can be observed."""
    return Policy("vanilla")


def window(n_local: int | None = None) -> Policy:
    """Sliding window of ``n_local`` keys (default: the pretraining length), no starting tokens."""
    return Policy("window", window=n_local, windowed=True)


def lambda_mask(n_global: int = 10, n_local: int | None = None) -> Policy:
    """Λ-shaped mask only: starting tokens plus the window, distances left as they are."""
    return Policy("lambda", window=n_local, n_global=n_global, windowed=True)


def distance_limit(limit: int | None = None) -> Policy:
    """Distance limit only (ReRoPE-like): every key, distances beyond ``limit`` clamped to ``limit``."""
    return Policy(
        "distance-limit", window=limit, n_global=EVERY_KEY, distance_limit=limit, windowed=True, limited=True
    )


def lm_infinite(
    n_global: int = 10,
    n_local: int | None = None,
    distance_limit: int | None = None,
    top_k: int = 0,
    top_k_from_layer: int = 4,
) -> Policy:
    """LM-Infinite: Λ-shaped mask plus distance limit (and optionally top-k middle tokens)."""
    return Policy(
        "lm-infinite",
        window=n_local,
        n_global=n_global,
        distance_limit=distance_limit,
        top_k=top_k,
        top_k_from_layer=top_k_from_layer,
        windowed=True,
        limited=True,
    )


POLICIES = {
    "vanilla": vanilla,
    "window": window,
    "lambda": lambda_mask,
    "distance-limit": distance_limit,
    "lm-infinite": lm_infinite,
}


def policy_by_name(name: str) -> Policy:
    """The default-parameter policy called ``name`` (one of :data:`POLICIES`)."""
    if name not in POLICIES:
        raise OodlensError(f"unknown method {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in layer order (modules with a ``layer_idx`` and a projection)."""
    found = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention") and hasattr(m, "config")
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def _train_length(model: nn.Module) -> int:
    from .models import model_info

    return model_info(model).train_length


class PolicyHandle:
    """Routes a model's attention through the engine until :meth:`remove` (or the end of a ``with`` block)."""

    def __init__(self, model: nn.Module, policy: Policy, observer=None, block_size: int | None = None):
        self.model = model
        self.policy = policy
        self._previous = model.config._attn_implementation
        self._modules = attention_modules(model)
        if not self._modules:
            raise OodlensError(f"found no attention layers in {type(model).__name__}")
        needs_rope = policy.rewrites_distance
        for module in self._modules:
            rotary = rotary_spec_for(model, module) if needs_rope else None
            binding = attention.Binding(policy.layer_plan(module.layer_idx, rotary), observer, block_size)
            attention.bind(module, binding)
        name = attention.register()
        try:
            model.set_attn_implementation(name)
        except Exception as error:  # transformers raises several types here
            self._unbind()
            raise OodlensError(
                f"{type(model).__name__} cannot switch attention implementation: {error}"
            ) from error
        if model.config._attn_implementation != name:
            self._unbind()
            raise OodlensError(
                f"{type(model).__name__} does not use transformers' attention interface "
                "(Bloom, MPT and Falcon have their own attention code), so oodlens cannot route its attention"
            )
        self.active = True

    def set_observer(self, observer) -> None:
        """Attach (or detach with ``None``) an observer to every layer."""
        for module in self._modules:
            binding = attention.binding_of(module)
            binding.observer = observer

    def _unbind(self) -> None:
        for module in self._modules:
            attention.unbind(module)

    def remove(self) -> None:
        """Restore the previous attention implementation (idempotent)."""
        if not getattr(self, "active", False):
            return
        self.model.set_attn_implementation(self._previous)
        self._unbind()
        self.active = False

    def new_cache(self, attention_mask=None):
        """A bounded decoding cache that keeps the starting tokens and the last window of keys per layer.

        Args:
            attention_mask: ``[B, T]`` padding mask of the prompt when the batch is left-padded, so that the
                first ``n_global`` *real* tokens of every row are kept.
        """
        from .cache import LMInfiniteCache

        if self.policy.window is None or self.policy.top_k > 0:
            raise OodlensError(
                f"policy {self.policy.name!r} needs the whole history (no window, or top-k over middle tokens); "
                "use the default dynamic cache"
            )
        extra = 0 if attention_mask is None else int((attention_mask == 0).long().cumprod(-1).sum(-1).max())
        return LMInfiniteCache(self.model.config, self.policy.n_global + extra, self.policy.window)

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_policy(
    model: nn.Module,
    policy: Policy,
    observer=None,
    train_length: int | None = None,
    block_size: int | None = None,
) -> PolicyHandle:
    """Route ``model``'s attention through ``policy`` (lengths resolved against ``train_length``).

    Raises:
        OodlensError: the model does not use the attention interface, or the policy needs RoPE and the model
            has none (learned absolute positions).
    """
    resolved = policy.resolve(train_length if train_length is not None else _train_length(model))
    return PolicyHandle(model, resolved, observer, block_size)


def native_or_policy(
    model: nn.Module, method: str, train_length: int | None = None
) -> contextlib.AbstractContextManager[PolicyHandle | None]:
    """For speed baselines: ``"vanilla"`` leaves the model's own attention (e.g. SDPA) untouched and yields
    ``None``; any other method name routes through the engine under that policy and yields its handle."""
    if method == "vanilla":
        return contextlib.nullcontext()
    return apply_policy(model, policy_by_name(method), train_length=train_length)


def apply_lm_infinite(
    model: nn.Module,
    n_global: int = 10,
    n_local: int | None = None,
    distance_limit: int | None = None,
    top_k: int = 0,
    top_k_from_layer: int = 4,
    train_length: int | None = None,
) -> PolicyHandle:
    """Apply LM-Infinite to ``model`` in place; ``n_local`` and ``distance_limit`` default to the training length.

    Example::

        with oodlens.apply_lm_infinite(model):
            loss = model(long_ids, labels=long_ids).loss
    """
    policy = lm_infinite(n_global, n_local, distance_limit, top_k, top_k_from_layer)
    return apply_policy(model, policy, train_length=train_length)
