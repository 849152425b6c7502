"""The shared prefix: the start of a sequence on which every method attends as vanilla does runs once, and
each method continues from its own copy of the key/value cache. Trunks: prompts that share a start which
grows from prompt to prompt (the filler before each needle) run it once per method, under that method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ..cache import continue_from
from ..policies import Policy, PolicyHandle, apply_policy, vanilla
from .scoring import Method, cache_kwargs, forward_hidden, new_cache, sequence_nll, token_nll


class SharedPrefix:
    """The first tokens of one sequence, run once under ``policy`` (vanilla by default); every method that
    attends as that policy does over them continues from its own copy of this key/value cache instead of
    computing them again.

    Below its window a policy *is* vanilla (see :meth:`~oodlens.policies.Policy.vanilla_prefix`), so for
    the usual methods the first ``train_length`` tokens of every window are shared. The cache holds the keys
    and values of ``length`` tokens in every layer while the methods run (all of them, also for a policy with
    a bounded cache: a continuation copies what its own cache keeps).
    """

    def __init__(self, model: PreTrainedModel, train_length: int, policy: Policy | None = None):
        self.model = model
        self.train_length = train_length
        self.policy = policy or vanilla()
        self._restart()

    def _restart(self) -> None:
        self.ids = torch.empty(0, dtype=torch.long)
        self.cache = DynamicCache(config=self.model.config)

    @property
    def length(self) -> int:
        return self.ids.numel()

    def extend(self, ids: torch.LongTensor, length: int) -> torch.Tensor:
        """Run this prefix's policy over ``ids[self.length:length]`` (``ids [T]`` must begin with the tokens
        already run); returns the last hidden states ``[length - self.length, d]`` of the new positions."""
        if not torch.equal(ids[: self.length], self.ids) or length <= self.length:
            raise ValueError(f"a prefix of {self.length} tokens cannot become {length} tokens of this text")
        device = self.model.get_output_embeddings().weight.device
        new = ids[self.length : length].to(device)[None]
        with apply_policy(self.model, self.policy, train_length=self.train_length):
            hidden = forward_hidden(self.model, new, use_cache=True, **cache_kwargs(self.model, self.cache))
        self.ids = ids[:length].clone()
        return hidden[0]

    def reach(self, text: torch.LongTensor, length: int) -> None:
        """Hold the first ``length`` tokens of ``text`` (extend, or restart if it holds more or others)."""
        if length < self.length or not torch.equal(text[: self.length], self.ids):
            self._restart()
        if length > self.length:
            self.extend(text, length)

    def fork(self) -> SharedPrefix:
        """A copy that can be extended without changing this one: prompts that share a start (the filler
        before a needle at one depth) each continue their own copy of it."""
        copy = SharedPrefix(self.model, self.train_length, self.policy)
        copy.ids = self.ids.clone()
        copy.cache = continue_from(self.cache, DynamicCache(config=self.model.config))
        return copy

    def begins(self, ids: torch.LongTensor) -> bool:
        """Whether ``ids`` starts with this prefix and goes on past it (so there is something to continue)."""
        return 0 < self.length < ids.numel() and torch.equal(ids[: self.length], self.ids)

    def cache_for(self, handle: PolicyHandle) -> Any:
        """A new cache for the applied policy, holding this prefix."""
        return continue_from(self.cache, new_cache(self.model, handle))


class Trunks:
    """Prompts whose common start grows from one to the next (passkey prompts: the intro and filler before
    each needle, the same at every length, taken in the order of the needles): per policy, one
    :class:`SharedPrefix` run under that policy and extended from prompt to prompt, so each prompt runs only
    from its needle on. A trunk keeps every key, also for a policy with a bounded cache (whose continuation
    copies only what it keeps), so its memory grows with the deepest needle."""

    def __init__(self, model: PreTrainedModel, train_length: int):
        self.model = model
        self.train_length = train_length
        self._by_policy: dict[Policy, SharedPrefix] = {}

    def up_to(self, policy: Policy, text: torch.LongTensor, length: int) -> SharedPrefix | None:
        """The trunk of ``policy`` holding ``text[:length]`` (extended, or restarted if it holds other
        tokens); None when there is nothing to share, or when the policy's result depends on how a sequence
        is split into calls (:meth:`~oodlens.policies.Policy.runs_in_pieces`)."""
        if length < 1 or not policy.runs_in_pieces(self.train_length):
            return None
        if policy not in self._by_policy:
            self._by_policy[policy] = SharedPrefix(self.model, self.train_length, policy)
        trunk = self._by_policy[policy]
        trunk.reach(text, length)
        return trunk


def shared_length(methods: Sequence[Method], train_length: int, limit: int, held: int = 0) -> int:
    """How many leading tokens of a sequence to run once, under vanilla, for ``methods``: of the lengths on
    which some of them attend as vanilla (at most ``limit``), the one that saves the most tokens. Each method
    that :func:`continues_prefix` skips the length; running it costs what the prefix does not hold yet
    (``held`` tokens of the same text already run; a shorter prefix is run again). 0 when sharing saves
    nothing, e.g. for a single method and an empty prefix. The truncated baseline gains at most its first
    piece of ``train_length`` tokens. Methods that attend otherwise (rescaled RoPE) run from their first
    token and leave the others' sharing intact."""
    best, most_saved = 0, 0
    reaches = sorted((_reach(method, train_length, limit) for method in methods), reverse=True)
    for sharing, reach in enumerate(reaches, start=1):
        cost = reach - held if reach >= held else reach
        if reach * sharing - cost > most_saved:
            best, most_saved = reach, reach * sharing - cost
    return best


def continues_prefix(method: Method, train_length: int, prefix_length: int) -> bool:
    """Whether ``method`` attends as vanilla over a shared prefix of ``prefix_length`` tokens, so it may
    continue from it (the others run from their first token)."""
    return method.policy.vanilla_prefix(train_length) >= prefix_length


def _reach(method: Method, train_length: int, limit: int) -> int:
    reach = min(method.policy.vanilla_prefix(train_length), limit)
    return min(reach, train_length) if method.truncated else reach


def continued_nll(
    model: PreTrainedModel,
    handle: PolicyHandle,
    ids: torch.LongTensor,
    prefix: SharedPrefix | None,
    prefix_nll: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Per-position NLL ``[T]`` of ``ids`` under the applied policy: the shared prefix's scores
    ``prefix_nll``, then one forward over the rest from a copy of the prefix's cache (one forward over all
    when ``ids`` does not continue the prefix, or there is none)."""
    if prefix is None or not prefix.begins(ids):
        return sequence_nll(model, ids, chunk)
    rest = ids[prefix.length :].to(model.get_output_embeddings().weight.device)
    cache = prefix.cache_for(handle)
    hidden = forward_hidden(model, rest[None], use_cache=True, **cache_kwargs(model, cache))[0]
    nll = prefix_nll.clone()
    nll[prefix.length + 1 :] = token_nll(model, hidden[:-1], rest[1:], chunk).cpu()
    return nll
