"""What every evaluation shares: the evaluated methods, inference mode, the cache keyword, and scoring
tokens without ever forming logits for a whole sequence.

Positions: token ``t`` of a sequence is scored by ``-log p(x_t | x_<t)``, so scores exist for ``t >= 1``;
per-token arrays are indexed by position and hold NaN at position 0. Buckets are half-open ``[start, end)``
ranges of positions.

Logits are never formed for a whole sequence: the model runs once with ``logits_to_keep=1`` while a hook keeps
the base model's last hidden states, and the output embedding is applied to ``chunk`` positions at a time
(float32 NLL, Gemma-2's final soft-capping included). The model's own last-position logits check that this
reproduces the family's logits, so a family that scales its logits some other way fails loudly.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from ..errors import OodlensError, check_train_length, non_finite_note
from ..policies import Policy, PolicyHandle, vanilla

TRUNCATED_BASELINE = "vanilla-truncated"  # vanilla with its context cut to at most train_length tokens
DEFAULT_CHUNK = 1024  # positions per output-embedding call
MAX_EXP_ARGUMENT = 709.0  # math.exp overflows a float64 beyond this


@dataclass(frozen=True)
class Method:
    """One evaluated method: a policy, optionally with its context truncated to ``train_length`` tokens."""

    name: str
    policy: Policy
    truncated: bool = False


def methods_of(policies: Sequence[Policy], truncated_baseline: bool) -> list[Method]:
    methods = [Method(policy.name, policy) for policy in policies]
    if truncated_baseline:
        methods.append(Method(TRUNCATED_BASELINE, vanilla(), truncated=True))
    names = [method.name for method in methods]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise OodlensError(
            f"several methods are called {', '.join(duplicates)}: give each policy its own name, "
            "e.g. dataclasses.replace(policy, name='lm-infinite-k5')"
        )
    if not methods:
        raise OodlensError("no methods to evaluate: pass at least one policy")
    return methods


@contextmanager
def inference(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode and no gradients for the duration; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _LengthReminderFilter(logging.Filter):
    """Drops transformers' "exceeded the model's predefined maximum length" reminder: running past the
    pretraining length is what oodlens is for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "predefined maximum length" not in record.getMessage()


@contextmanager
def past_the_pretraining_length() -> Iterator[None]:
    """Within the block, transformers' reminder that generation runs past the model's length is not shown."""
    reminder = logging.getLogger("transformers.generation.stopping_criteria")
    quiet = _LengthReminderFilter()
    reminder.addFilter(quiet)
    try:
        yield
    finally:
        reminder.removeFilter(quiet)


@functools.cache
def _accepts_cache_keyword(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_kwargs(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """The cache keyword this transformers understands: ``cache`` from 5.24, ``past_key_values`` before."""
    return {"cache" if _accepts_cache_keyword(type(model)) else "past_key_values": cache}


def new_cache(model: PreTrainedModel, handle: PolicyHandle) -> Any:
    """An empty cache for the applied policy: bounded where it can be (see :meth:`Policy.cache_plan`), else
    transformers' dynamic cache."""
    if handle.policy.cache_plan(handle.train_length).bounded:
        return handle.new_cache()
    return DynamicCache(config=model.config)


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[..., V]`` of hidden states ``[..., d]``, soft-capped as the family does (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def forward_hidden(model: PreTrainedModel, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """Last hidden states ``[B, T, d]`` of one forward; checks our logits against the model's last ones."""
    if model.get_output_embeddings() is None:
        raise OodlensError(f"{type(model).__name__} has no language-model head: load a causal LM")
    captured: dict[str, torch.Tensor] = {}

    def keep_hidden(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = output[0]

    hook = model.base_model.register_forward_hook(keep_hidden)
    try:
        # logits_to_keep=1: the head runs on one position, so no [T, V] logits are ever formed here.
        theirs = model(input_ids=input_ids, logits_to_keep=1, **forward_kwargs).logits[:, -1].float()
    finally:
        hook.remove()
    hidden = captured["hidden"]
    if not bool(torch.isfinite(hidden).all()):  # the NLL of such positions is NaN: say why, and the fix
        warnings.warn(
            f"oodlens: {non_finite_note('the model’s last hidden states', hidden.dtype)}", stacklevel=3
        )
    _check_same_logits(model, output_logits(model, hidden[:, -1]), theirs)
    return hidden


def _check_same_logits(model: PreTrainedModel, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Relative to the largest logit, loose enough for the rounding of half-precision heads.
    relative = max(1e-4, 8 * torch.finfo(model.get_output_embeddings().weight.dtype).eps)
    tolerance = relative * max(1.0, theirs.abs().max().item())
    if not torch.allclose(ours, theirs, rtol=0.0, atol=tolerance) and torch.isfinite(theirs).all():
        gap = (ours - theirs).abs().max().item()
        raise OodlensError(
            f"{model.config.model_type} transforms its logits in a way oodlens does not reproduce "
            f"(max |Δlogit| {gap:.3g}): please report this family"
        )


def token_nll(
    model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Float32 NLL ``[T]`` of ``targets [T]`` given hidden states ``[T, d]``, ``chunk`` rows at a time."""
    pieces = [
        F.cross_entropy(
            output_logits(model, hidden[start : start + chunk]),
            targets[start : start + chunk],
            reduction="none",
        )
        for start in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def sequence_nll(
    model: PreTrainedModel, ids: torch.LongTensor, chunk: int = DEFAULT_CHUNK, score_from: int = 1
) -> torch.Tensor:
    """Per-position NLL ``[T]`` (float32, CPU) of one sequence ``ids [T]`` in one forward.

    Positions before ``score_from`` (at least position 0, which has no prediction) are NaN; the vocabulary
    projection runs only for the scored ones. The model runs as it is (apply a policy around the call to
    change its attention).
    """
    score_from = max(score_from, 1)
    device = model.get_output_embeddings().weight.device
    ids = ids.to(device)
    hidden = forward_hidden(model, ids[None], use_cache=False)[0]
    nll = torch.full((ids.shape[0],), math.nan)
    nll[score_from:] = token_nll(model, hidden[score_from - 1 : -1], ids[score_from:], chunk).cpu()
    return nll


def truncated_sequence_nll(
    model: PreTrainedModel, ids: torch.LongTensor, train_length: int, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Per-position NLL ``[T]`` with at most ``train_length`` tokens of context (content-matched baseline).

    Forwards over pieces of ``train_length`` tokens with stride ``train_length // 2``; each token is scored
    once, in the first piece that contains it, which is the piece where it has the most context (the first
    piece scores all its tokens, later pieces their last ``stride`` tokens, each with at least
    ``train_length - stride`` tokens of context).
    """
    return truncated_nll(model, ids, train_length, chunk, start_nll=None)


def truncated_nll(
    model: PreTrainedModel,
    ids: torch.LongTensor,
    train_length: int,
    chunk: int,
    start_nll: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`truncated_sequence_nll`; ``start_nll [T]`` (NaN where not computed) holds vanilla's scores of
    the sequence's first tokens, which are the first piece's when they cover it."""
    check_train_length(train_length)
    length = ids.shape[0]
    nll = torch.full((length,), math.nan)
    stride = train_length // 2
    start, scored_until = 0, 1
    while scored_until < length:
        stop = min(start + train_length, length)
        known = start_nll[scored_until:stop] if start == 0 and start_nll is not None else None
        if known is not None and not known.isnan().any():
            nll[scored_until:stop] = known
        else:
            nll[scored_until:stop] = sequence_nll(model, ids[start:stop], chunk, scored_until - start)[
                scored_until - start :
            ]
        scored_until = stop
        start += stride
    return nll


def progress_bar(total: int | None, enabled: bool, unit: str, description: str) -> tqdm:
    return tqdm(total=total, disable=not enabled, unit=unit, desc=description, leave=False)


def perplexity_of(nll: float) -> float:
    """``exp(nll)``, infinite rather than an OverflowError for an exploded model (NaN stays NaN)."""
    return math.inf if nll > MAX_EXP_ARGUMENT else math.exp(nll)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: an undefined or overflowing perplexity becomes ``None``."""
    return float(value) if math.isfinite(value) else None


def bucket_ranges(length: int, bucket: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket, length)) for start in range(0, length, bucket)]
