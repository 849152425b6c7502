"""Applying a policy to a model: :func:`apply_policy` routes its attention through the engine and returns a
:class:`PolicyHandle` (also a context manager) whose ``remove()`` restores the previous attention
implementation exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from .. import attention
from ..cache import BoundedCache, StaticBoundedCache
from ..errors import OodlensError
from ..models import ModelParts, train_length_of
from ..rope import rotary_spec_for
from .base import Policy
from .lm_infinite import lm_infinite
from .registry import policy_by_name
from .rope_scaling import rebuild_rotary


class PolicyHandle:
    """Routes a model's attention through the engine until :meth:`remove` (or the end of a ``with`` block).

    A model takes one policy at a time: applying a second one before removing the first is refused, so the
    order of removals can never leave the model half-restored.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        train_length: int,
        observer: attention.AttentionObserver | None = None,
        block_size: int | None = None,
    ):
        self.model = model
        self.policy = policy
        self.train_length = train_length
        self.parts = ModelParts.of(model)
        if any(attention.binding_of(module) is not None for module in self.parts.attention):
            raise OodlensError(
                f"{type(model).__name__} already runs under an oodlens policy: remove it first "
                "(handle.remove(), or leave its with-block) before applying another"
            )
        self._previous = model.config._attn_implementation
        self._restore_rotary = (
            rebuild_rotary(model, dict(policy.rope_parameters))
            if policy.rope_parameters is not None
            else None
        )
        needs_rope = policy.rewrites_positions
        for module in self.parts.attention:
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

    def observe(
        self, observer: attention.AttentionObserver | None, layers: Iterable[int] | None = None
    ) -> None:
        """Attach ``observer`` to the attention layers numbered ``layers`` (``None``: all) and detach it from
        the others, where the engine then skips all observer work."""
        chosen = None if layers is None else set(layers)
        for module in self.parts.attention:
            watched = chosen is None or module.layer_idx in chosen
            attention.binding_of(module).observer = observer if watched else None

    def _unbind(self) -> None:
        for module in self.parts.attention:
            attention.unbind(module)
        if self._restore_rotary is not None:
            self._restore_rotary()
            self._restore_rotary = None

    def remove(self) -> None:
        """Restore the previous attention implementation (idempotent)."""
        if not getattr(self, "active", False):
            return
        self.model.set_attn_implementation(self._previous)
        self._unbind()
        self.active = False

    def new_cache(self, attention_mask: torch.Tensor | None = None, static: bool = False) -> BoundedCache:
        """A bounded decoding cache that keeps the starting tokens and the last window of keys per layer.

        Args:
            attention_mask: ``[B, T]`` padding mask of the prompt when the batch is left-padded, so that the
                first ``n_global`` *real* tokens of every row are kept.
            static: preallocate the cache and write it in place (:class:`~oodlens.cache.StaticBoundedCache`):
                a decoding step then never waits for the device and can be captured as a CUDA graph; for
                batches without padding and runs without observers.

        Raises:
            OodlensError: the policy needs the whole history (see :meth:`Policy.cache_plan`), or a static
                cache was asked for a padded batch.
        """
        plan = self.policy.cache_plan(self.train_length)
        if not plan.bounded:
            raise OodlensError(f"{plan.reason}, so it needs the whole history: use the default dynamic cache")
        padded = 0 if attention_mask is None else int((attention_mask == 0).long().cumprod(-1).sum(-1).max())
        if static:
            if padded:
                raise OodlensError("a static bounded cache decodes unpadded batches: pass static=False")
            cache = StaticBoundedCache(self.model.config, plan.n_global, plan.window)
        else:
            cache = BoundedCache(self.model.config, plan.n_global + padded, plan.window)
        for module in self.parts.attention:
            attention.binding_of(module).caches.add(cache)
        return cache

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_policy(
    model: nn.Module,
    policy: Policy,
    observer: attention.AttentionObserver | None = None,
    train_length: int | None = None,
    block_size: int | None = None,
) -> PolicyHandle:
    """Route ``model``'s attention through ``policy`` (lengths resolved against ``train_length``, by default
    the model's pretraining length).

    Raises:
        OodlensError: the model does not use the attention interface, already runs under a policy, or the
            policy needs RoPE and the model has none (learned absolute positions).
    """
    length = train_length_of(model, train_length)
    return PolicyHandle(model, policy.resolve(length), length, observer, block_size)


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
    """Apply LM-Infinite to ``model`` in place; ``n_local`` and ``distance_limit`` default to the training
    length.

    Example::

        with oodlens.apply_lm_infinite(model):
            loss = model(long_ids, labels=long_ids).loss
    """
    policy = lm_infinite(n_global, n_local, distance_limit, top_k, top_k_from_layer)
    return apply_policy(model, policy, train_length=train_length)
