"""Evaluation: perplexity by position, passkey retrieval, generation quality, streaming perplexity.

Every evaluation takes :class:`~oodlens.policies.Policy` objects (``policy.name`` labels the rows), applies
each with :func:`~oodlens.policies.apply_policy` (which restores the model afterwards), runs under
``torch.no_grad()`` in eval mode, and returns a result object with ``to_dataframe()`` and ``summary()`` (a
JSON-ready dict).

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
import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from .cache import continue_from
from .data import passkey_prompt
from .errors import OodlensError
from .models import ModelInfo
from .policies import EVERY_KEY, Policy, PolicyHandle, apply_policy, vanilla

TRUNCATED_BASELINE = "vanilla-truncated"  # vanilla with its context cut to at most train_length tokens
DEFAULT_CHUNK = 1024  # positions per output-embedding call
DEFAULT_BUCKET = 1024
DEFAULT_STREAM_BUCKET = 4096
FIRST_NUMBER = re.compile(r"\d+")
MAX_EXP_ARGUMENT = 709.0  # math.exp overflows a float64 beyond this


# --------------------------------------------------------------------------------------------------------
# Shared plumbing: methods, inference mode, chunked NLL
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    """One evaluated method: a policy, optionally with its context truncated to ``train_length`` tokens."""

    name: str
    policy: Policy
    truncated: bool = False


def _methods(policies: Sequence[Policy], truncated_baseline: bool) -> list[_Method]:
    methods = [_Method(policy.name, policy) for policy in policies]
    if truncated_baseline:
        methods.append(_Method(TRUNCATED_BASELINE, vanilla(), truncated=True))
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


def _check_train_length(train_length: int) -> None:
    if not isinstance(train_length, int) or train_length < 2:
        raise OodlensError(f"train_length must be an integer ≥ 2 tokens, got {train_length!r}")


@contextmanager
def _inference(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode and no gradients for the duration; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@functools.cache
def _accepts_cache_keyword(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def _cache_kwargs(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """The cache keyword this transformers understands: ``cache`` from 5.24, ``past_key_values`` before."""
    return {"cache" if _accepts_cache_keyword(type(model)) else "past_key_values": cache}


def _bounded_cache_possible(policy: Policy) -> bool:
    """Whether a resolved policy decodes in O(window) memory: beyond its window it keeps only the first
    ``n_global`` tokens (not every key, as the distance limit alone or top-k over middle tokens need)."""
    return policy.window is not None and policy.top_k == 0 and policy.n_global < EVERY_KEY


def _new_cache(model: PreTrainedModel, handle: PolicyHandle) -> Any:
    """An empty cache for the applied policy: bounded where it can be, else transformers' dynamic cache."""
    if _bounded_cache_possible(handle.policy):
        return handle.new_cache()
    return DynamicCache(config=model.config)


class _SharedPrefix:
    """The first tokens of one sequence, run once under vanilla; every method that attends as vanilla does
    over them continues from its own copy of this key/value cache instead of computing them again.

    Below its window a policy *is* vanilla (see :meth:`~oodlens.policies.Policy.vanilla_prefix`), so for
    the usual methods the first ``train_length`` tokens of every window are shared. The cache holds the keys
    and values of ``length`` tokens in every layer while the methods run.
    """

    def __init__(self, model: PreTrainedModel, train_length: int):
        self.model = model
        self.train_length = train_length
        self._restart()

    def _restart(self) -> None:
        self.ids = torch.empty(0, dtype=torch.long)
        self.cache = DynamicCache(config=self.model.config)

    @property
    def length(self) -> int:
        return self.ids.numel()

    def extend(self, ids: torch.LongTensor, length: int) -> torch.Tensor:
        """Run vanilla over ``ids[self.length:length]`` (``ids [T]`` must begin with the tokens already run);
        returns the last hidden states ``[length - self.length, d]`` of the new positions."""
        if not torch.equal(ids[: self.length], self.ids) or length <= self.length:
            raise ValueError(f"a prefix of {self.length} tokens cannot become {length} tokens of this text")
        device = self.model.get_output_embeddings().weight.device
        new = ids[self.length : length].to(device)[None]
        with apply_policy(self.model, vanilla(), train_length=self.train_length):
            hidden = _forward_hidden(self.model, new, use_cache=True, **_cache_kwargs(self.model, self.cache))
        self.ids = ids[:length].clone()
        return hidden[0]

    def reach(self, text: torch.LongTensor, length: int) -> None:
        """Hold the first ``length`` tokens of ``text`` (extend, or restart if it holds more or others)."""
        if length < self.length or not torch.equal(text[: self.length], self.ids):
            self._restart()
        if length > self.length:
            self.extend(text, length)

    def begins(self, ids: torch.LongTensor) -> bool:
        """Whether ``ids`` starts with this prefix and goes on past it (so there is something to continue)."""
        return 0 < self.length < ids.numel() and torch.equal(ids[: self.length], self.ids)

    def cache_for(self, handle: PolicyHandle) -> Any:
        """A new cache for the applied policy, holding this prefix."""
        return continue_from(self.cache, _new_cache(self.model, handle))


def _shared_length(methods: Sequence[_Method], train_length: int, limit: int) -> int:
    """Leading tokens on which every method attends as vanilla does (at most ``limit``); 0 for a single
    method, which has nobody to share with."""
    if len(methods) < 2:
        return 0
    return min([method.policy.vanilla_prefix(train_length) for method in methods] + [limit])


def _logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[..., V]`` of hidden states ``[..., d]``, soft-capped as the family does (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _forward_hidden(model: PreTrainedModel, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
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
    _check_same_logits(model, _logits(model, hidden[:, -1]), theirs)
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


def _nll(model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Float32 NLL ``[T]`` of ``targets [T]`` given hidden states ``[T, d]``, ``chunk`` rows at a time."""
    pieces = [
        F.cross_entropy(
            _logits(model, hidden[start : start + chunk]), targets[start : start + chunk], reduction="none"
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
    hidden = _forward_hidden(model, ids[None], use_cache=False)[0]
    nll = torch.full((ids.shape[0],), math.nan)
    nll[score_from:] = _nll(model, hidden[score_from - 1 : -1], ids[score_from:], chunk).cpu()
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
    return _truncated_nll(model, ids, train_length, chunk, start_nll=None)


def _truncated_nll(
    model: PreTrainedModel,
    ids: torch.LongTensor,
    train_length: int,
    chunk: int,
    start_nll: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`truncated_sequence_nll`; ``start_nll [T]`` (NaN where not computed) holds vanilla's scores of
    the sequence's first tokens, which are the first piece's when they cover it."""
    _check_train_length(train_length)
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


def _continued_nll(
    model: PreTrainedModel,
    handle: PolicyHandle,
    ids: torch.LongTensor,
    prefix: _SharedPrefix,
    prefix_nll: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Per-position NLL ``[T]`` of ``ids`` under the applied policy: the shared prefix's scores
    ``prefix_nll``, then one forward over the rest from a copy of the prefix's cache (one forward over all
    when ``ids`` does not continue the prefix)."""
    if not prefix.begins(ids):
        return sequence_nll(model, ids, chunk)
    rest = ids[prefix.length :].to(model.get_output_embeddings().weight.device)
    cache = prefix.cache_for(handle)
    hidden = _forward_hidden(model, rest[None], use_cache=True, **_cache_kwargs(model, cache))[0]
    nll = prefix_nll.clone()
    nll[prefix.length + 1 :] = _nll(model, hidden[:-1], rest[1:], chunk).cpu()
    return nll


def _progress(total: int | None, enabled: bool, unit: str, description: str) -> tqdm:
    return tqdm(total=total, disable=not enabled, unit=unit, desc=description, leave=False)


def _perplexity(nll: float) -> float:
    """``exp(nll)``, infinite rather than an OverflowError for an exploded model (NaN stays NaN)."""
    return math.inf if nll > MAX_EXP_ARGUMENT else math.exp(nll)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: an undefined or overflowing perplexity becomes ``None``."""
    return float(value) if math.isfinite(value) else None


def _bucket_ranges(length: int, bucket: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket, length)) for start in range(0, length, bucket)]


# --------------------------------------------------------------------------------------------------------
# 1. Perplexity by position
# --------------------------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """Per-position NLL of each method, averaged over windows.

    Attributes:
        token_nll: method → ``[length]`` float32 array, mean NLL over windows of the token at each position
            (NaN at position 0, which nothing predicts).
        train_length, length, n_windows, bucket: the run's settings.

    ``to_dataframe()`` rows: ``{method, start, end, nll, ppl, n_tokens}`` per bucket ``[start, end)`` of
    positions; ``nll`` is the mean NLL over the bucket's scored tokens, ``ppl = exp(nll)``, ``n_tokens`` the
    number of scored tokens (positions × windows).
    """

    token_nll: dict[str, np.ndarray]
    train_length: int
    length: int
    n_windows: int
    bucket: int

    def mean_nll(self, method: str, start: int = 1, end: int | None = None) -> float:
        """Mean NLL of ``method`` over positions ``[start, end)`` (NaN when the range scores nothing)."""
        values = self.token_nll[method][max(start, 1) : self.length if end is None else end]
        return float(np.mean(values)) if values.size else math.nan

    def ppl(self, method: str, start: int = 1, end: int | None = None) -> float:
        """Perplexity of ``method`` over positions ``[start, end)``."""
        return _perplexity(self.mean_nll(method, start, end))

    def to_dataframe(self) -> pd.DataFrame:
        rows = []
        for method in self.token_nll:
            for start, end in _bucket_ranges(self.length, self.bucket):
                nll = self.mean_nll(method, start, end)
                scored = end - max(start, 1)
                if scored > 0:
                    rows.append(
                        dict(
                            method=method,
                            start=start,
                            end=end,
                            nll=nll,
                            ppl=_perplexity(nll),
                            n_tokens=scored * self.n_windows,
                        )
                    )
        return pd.DataFrame(rows, columns=["method", "start", "end", "nll", "ppl", "n_tokens"])

    def summary(self) -> dict[str, Any]:
        """``{train_length, length, n_windows, bucket, methods: {method: {buckets: [{start, end, ppl}],
        ppl_within_train_length, ppl_beyond_train_length}}}``; non-finite perplexities are ``None``."""
        table = self.to_dataframe()
        methods = {}
        for method, rows in table.groupby("method", sort=False):
            within_end = min(self.train_length, self.length)
            methods[method] = {
                "buckets": [
                    {"start": int(row.start), "end": int(row.end), "ppl": _finite_or_none(row.ppl)}
                    for row in rows.itertuples()
                ],
                "ppl_within_train_length": _finite_or_none(self.ppl(method, 1, within_end)),
                "ppl_beyond_train_length": _finite_or_none(self.ppl(method, self.train_length, self.length)),
            }
        return {
            "train_length": self.train_length,
            "length": self.length,
            "n_windows": self.n_windows,
            "bucket": self.bucket,
            "methods": methods,
        }


def perplexity_by_position(
    model: PreTrainedModel,
    windows: torch.LongTensor,
    policies: Sequence[Policy],
    *,
    train_length: int,
    bucket: int = DEFAULT_BUCKET,
    chunk: int = DEFAULT_CHUNK,
    truncated_baseline: bool = True,
    share_prefix: bool = True,
    progress: bool = True,
) -> PerplexityResult:
    """NLL of every position of ``windows [n, length]`` under each policy, one forward per window and method.

    ``truncated_baseline`` adds :data:`TRUNCATED_BASELINE`: vanilla with at most ``train_length`` tokens of
    context (see :func:`truncated_sequence_nll`), which scores the same tokens without ever leaving the
    training distribution, so it separates "the fix works" from "later text is harder".

    ``share_prefix``: every method attends as vanilla does below its window (for the usual methods, the
    first ``train_length`` tokens), so with several methods that part of each window runs once,
    under vanilla, and each method continues from a copy of its key/value cache (the baseline reuses it as its
    first piece). The scores are those of one forward per method up to float rounding; the cost is the cache
    of the shared tokens and of each method's continuation. ``False`` runs every method from the first token
    without a cache.
    """
    _check_train_length(train_length)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise OodlensError(
            f"windows must be [n, length] token ids with length ≥ 2, got shape {tuple(windows.shape)}"
        )
    if bucket < 1 or chunk < 1:
        raise OodlensError(f"bucket and chunk must be positive, got {bucket} and {chunk}")
    methods = _methods(policies, truncated_baseline)
    shared = _shared_length(methods, train_length, windows.shape[1] - 1) if share_prefix else 0
    total = {method.name: torch.zeros(windows.shape[1]) for method in methods}
    with _inference(model), _progress(len(methods) * len(windows), progress, "window", "perplexity") as bar:
        for ids in windows:
            prefix = _SharedPrefix(model, train_length)
            prefix_nll = torch.full((ids.shape[0],), math.nan)
            if shared:
                hidden = prefix.extend(ids, shared)
                targets = ids[1 : shared + 1].to(hidden.device)
                prefix_nll[1 : shared + 1] = _nll(model, hidden, targets, chunk).cpu()
            for method in methods:
                with apply_policy(model, method.policy, train_length=train_length) as handle:
                    if method.truncated:
                        total[method.name] += _truncated_nll(model, ids, train_length, chunk, prefix_nll)
                    else:
                        total[method.name] += _continued_nll(model, handle, ids, prefix, prefix_nll, chunk)
                bar.update()
    token_nll = {name: (summed / len(windows)).numpy() for name, summed in total.items()}
    return PerplexityResult(token_nll, train_length, windows.shape[1], len(windows), bucket)


# --------------------------------------------------------------------------------------------------------
# Greedy generation under a policy (passkey and generation quality)
# --------------------------------------------------------------------------------------------------------


def _greedy(
    model: PreTrainedModel,
    handle: PolicyHandle,
    prompt: torch.LongTensor,
    max_new_tokens: int,
    pad_token_id: int | None,
    prefix: _SharedPrefix | None = None,
) -> torch.LongTensor:
    """The ``≤ max_new_tokens`` ids greedily generated after ``prompt [T]``, continuing from ``prefix`` when
    the prompt begins with it; windowed policies decode with the bounded cache, so memory stays flat however
    long the prompt is."""
    device = model.get_output_embeddings().weight.device
    ids = prompt.to(device)[None]
    continues = prefix is not None and prefix.begins(prompt)
    cache = prefix.cache_for(handle) if continues else _new_cache(model, handle)
    output = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        **_cache_kwargs(model, cache),
    )
    return output[0, ids.shape[1] :].cpu()


def _answer_key(policy: Policy, prompt: torch.LongTensor, max_new_tokens: int, train_length: int) -> tuple:
    """What a greedy answer depends on: the prompt, and the policy unless it attends as vanilla over every
    position that predicts a token (then its answer is vanilla's, e.g. LM-Infinite on a prompt that fits in
    its window, or the truncated baseline of such a prompt)."""
    last_query = prompt.numel() + max_new_tokens - 2
    as_vanilla = last_query < policy.vanilla_prefix(train_length)
    return (vanilla() if as_vanilla else policy, tuple(prompt.tolist()))


def _greedy_jobs(
    model: PreTrainedModel,
    jobs: Sequence[tuple[_Method, torch.LongTensor]],
    text: torch.LongTensor,
    prefix: _SharedPrefix | None,
    max_new_tokens: int,
    pad_token_id: int | None,
    train_length: int,
    answers: dict[tuple, torch.LongTensor],
) -> list[torch.LongTensor]:
    """The greedy answer to each ``(method, prompt)`` job, memoised in ``answers`` (see :func:`_answer_key`).

    With a ``prefix``, the jobs to run whose prompts begin ``text [T]`` first share its longest start on which
    they all attend as vanilla (``prefix`` is extended to it, or restarted if it holds more).
    """
    keys = [_answer_key(method.policy, ids, max_new_tokens, train_length) for method, ids in jobs]
    todo: dict[tuple, tuple[_Method, torch.LongTensor]] = {}
    for key, job in zip(keys, jobs, strict=True):
        if key not in answers:
            todo.setdefault(key, job)
    starts = [(method, ids) for method, ids in todo.values() if torch.equal(ids, text[: ids.numel()])]
    if prefix is not None and starts:
        vanilla_until = [
            min(method.policy.vanilla_prefix(train_length), ids.numel() - 1) for method, ids in starts
        ]
        prefix.reach(text, min(vanilla_until))
    for key, (method, ids) in todo.items():
        with apply_policy(model, method.policy, train_length=train_length) as handle:
            answers[key] = _greedy(model, handle, ids, max_new_tokens, pad_token_id, prefix)
    return [answers[key] for key in keys]


def _pad_token_id(tokenizer: Any) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------------
# 2. Passkey retrieval
# --------------------------------------------------------------------------------------------------------


def passkey_correct(generated: str, passkey: str) -> bool:
    """Whether the first run of digits in ``generated`` is exactly ``passkey``.

    Words before the number are allowed (``" The pass key is 12345"`` is correct, the model may repeat the
    question); ``"12345."`` is correct; ``"1234"``, ``"123456"`` and ``"12 345"`` are wrong.
    """
    match = FIRST_NUMBER.search(generated)
    return match is not None and match.group() == passkey


def _passkey_seed(seed: int, length: int, depth: float, sample: int) -> int:
    """A different key for every cell and sample, reproducible from ``seed``."""
    return int(np.random.SeedSequence([seed, length, round(depth * 1_000_000), sample]).generate_state(1)[0])


@dataclass
class PasskeyResult:
    """Passkey rows: ``{method, length, depth, sample, passkey, prompt_tokens, generated, correct}``.

    ``length`` and ``depth`` are the requested cell; ``prompt_tokens`` is the prompt's real size (at most
    ``length``; for :data:`TRUNCATED_BASELINE`, at most ``train_length``).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        columns = ["method", "length", "depth", "sample", "passkey", "prompt_tokens", "generated", "correct"]
        return pd.DataFrame(self.rows, columns=columns)

    def accuracy(self, by_depth: bool = False) -> pd.DataFrame:
        """Accuracy (fraction correct) and sample count ``n`` by (method, length[, depth])."""
        keys = ["method", "length", "depth"] if by_depth else ["method", "length"]
        table = self.to_dataframe().groupby(keys, sort=False)["correct"]
        return table.agg(accuracy="mean", n="size").reset_index()

    def summary(self) -> dict[str, dict[str, float]]:
        """``{method: {str(length): accuracy}}``."""
        summary: dict[str, dict[str, float]] = {}
        for row in self.accuracy().itertuples():
            summary.setdefault(row.method, {})[str(row.length)] = float(row.accuracy)
        return summary


def passkey_retrieval(
    model: PreTrainedModel,
    tokenizer: Any,
    policies: Sequence[Policy],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    samples_per_cell: int = 1,
    train_length: int,
    max_new_tokens: int = 8,
    truncated_baseline: bool = True,
    seed: int = 0,
    share_prefix: bool = True,
    progress: bool = True,
) -> PasskeyResult:
    """Greedy passkey retrieval for every (method, length, depth, sample), prompts from
    :func:`oodlens.data.passkey_prompt`.

    :data:`TRUNCATED_BASELINE` keeps only the last ``train_length`` prompt tokens (the question stays) and
    runs vanilla. The paper's LM-Infinite passkey numbers use ``lm_infinite(top_k=5)``.

    A method that attends as vanilla over the whole prompt and answer (e.g. LM-Infinite on a prompt that fits
    in its window) gives vanilla's answer, which is generated once. ``share_prefix`` runs the start of each
    prompt on which the methods attend as vanilla once (see :func:`perplexity_by_position`).
    """
    _check_train_length(train_length)
    if samples_per_cell < 1 or max_new_tokens < 1:
        raise OodlensError("samples_per_cell and max_new_tokens must be ≥ 1")
    methods = _methods(policies, truncated_baseline)
    cells = [
        (length, depth, sample)
        for length in lengths
        for depth in depths
        for sample in range(samples_per_cell)
    ]
    prompts = {
        cell: passkey_prompt(tokenizer, cell[0], cell[1], seed=_passkey_seed(seed, *cell)) for cell in cells
    }
    result = PasskeyResult()
    answers: dict[tuple, torch.LongTensor] = {}
    pad_token_id = _pad_token_id(tokenizer)
    with _inference(model), _progress(len(methods) * len(cells), progress, "prompt", "passkey") as bar:
        for (length, depth, sample), prompt in prompts.items():
            full = prompt.input_ids
            jobs = [(method, full[-train_length:] if method.truncated else full) for method in methods]
            prefix = _SharedPrefix(model, train_length) if share_prefix else None
            outputs = _greedy_jobs(
                model, jobs, full, prefix, max_new_tokens, pad_token_id, train_length, answers
            )
            for (method, ids), new_ids in zip(jobs, outputs, strict=True):
                generated = tokenizer.decode(new_ids, skip_special_tokens=True)
                result.rows.append(dict(
                    method=method.name, length=length, depth=depth, sample=sample, passkey=prompt.passkey,
                    prompt_tokens=len(ids), generated=generated,
                    correct=passkey_correct(generated, prompt.passkey),
                ))  # fmt: skip
                bar.update()
    order = {method.name: index for index, method in enumerate(methods)}
    result.rows.sort(key=lambda row: order[row["method"]])  # stable: cells stay in their order
    return result


# --------------------------------------------------------------------------------------------------------
# 3. Generation quality (the paper's Table 3)
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def continuation_scores(generated: str, reference: str) -> tuple[float, float]:
    """(BLEU in [0, 100], ROUGE-L F1 in [0, 1]) of a generated continuation against the real one.

    BLEU is sacrebleu's sentence BLEU (13a tokenisation, exponential smoothing, effective order); ROUGE-L is
    rouge-score's ``rougeL`` F-measure (lower-cased alphanumeric tokens).
    """
    import sacrebleu

    bleu = sacrebleu.sentence_bleu(generated, [reference]).score
    rouge_l = _rouge_scorer().score(reference, generated)["rougeL"].fmeasure
    return float(bleu), float(rouge_l)


@dataclass
class GenerationResult:
    """Rows ``{method, window, milestone, bleu, rouge_l, generated, reference}``.

    After the first ``milestone`` tokens of window number ``window``, ``generated`` is the model's greedy
    continuation and ``reference`` the real next ``new_tokens`` tokens, both detokenised.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        columns = ["method", "window", "milestone", "bleu", "rouge_l", "generated", "reference"]
        return pd.DataFrame(self.rows, columns=columns)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{method: {str(milestone): {"bleu": mean, "rouge_l": mean}}}`` (means over windows)."""
        means = self.to_dataframe().groupby(["method", "milestone"], sort=False)[["bleu", "rouge_l"]].mean()
        summary: dict[str, dict[str, dict[str, float]]] = {}
        for (method, milestone), row in means.iterrows():
            summary.setdefault(method, {})[str(milestone)] = {
                "bleu": float(row.bleu),
                "rouge_l": float(row.rouge_l),
            }
        return summary


def generation_quality(
    model: PreTrainedModel,
    tokenizer: Any,
    windows_or_tokens: torch.LongTensor,
    policies: Sequence[Policy],
    *,
    milestones: Sequence[int],
    new_tokens: int = 100,
    train_length: int,
    share_prefix: bool = True,
    progress: bool = True,
) -> GenerationResult:
    """For each window of ``[n, T]`` (or one sequence ``[T]``) and milestone ``m``: generate ``new_tokens``
    greedily after its first ``m`` tokens and score them against tokens ``[m, m + new_tokens)``.

    Generation stops early at the end-of-sequence token, as the model would. A method that attends as vanilla
    over the prompt and its continuation gives vanilla's continuation, generated once. ``share_prefix`` runs
    the start of each window on which the methods attend as vanilla once, growing it from one milestone to the
    next (see :func:`perplexity_by_position`).
    """
    _check_train_length(train_length)
    windows = windows_or_tokens[None] if windows_or_tokens.dim() == 1 else windows_or_tokens
    too_long = [m for m in milestones if m < 1 or m + new_tokens > windows.shape[1]]
    if too_long or not milestones:
        raise OodlensError(
            f"milestones must lie in [1, {windows.shape[1] - new_tokens}] so that {new_tokens} real tokens "
            f"follow each one in windows of {windows.shape[1]} tokens; got {list(milestones)}"
        )
    methods = _methods(policies, truncated_baseline=False)
    result = GenerationResult()
    pad_token_id = _pad_token_id(tokenizer)
    total = len(methods) * len(windows) * len(milestones)
    with _inference(model), _progress(total, progress, "continuation", "generation") as bar:
        for index, window in enumerate(windows):
            prefix = _SharedPrefix(model, train_length) if share_prefix else None
            answers: dict[tuple, torch.LongTensor] = {}
            for milestone in sorted(milestones):  # ascending, so the shared prefix only grows
                jobs = [(method, window[:milestone]) for method in methods]
                outputs = _greedy_jobs(
                    model, jobs, window, prefix, new_tokens, pad_token_id, train_length, answers
                )
                real = window[milestone : milestone + new_tokens]
                reference = tokenizer.decode(real, skip_special_tokens=True)
                for method, new_ids in zip(methods, outputs, strict=True):
                    generated = tokenizer.decode(new_ids, skip_special_tokens=True)
                    bleu, rouge_l = continuation_scores(generated, reference)
                    result.rows.append(dict(
                        method=method.name, window=index, milestone=milestone, bleu=bleu, rouge_l=rouge_l,
                        generated=generated, reference=reference,
                    ))  # fmt: skip
                    bar.update()
    order = {method.name: index for index, method in enumerate(methods)}
    position = {milestone: index for index, milestone in enumerate(milestones)}
    result.rows.sort(key=lambda row: (order[row["method"]], row["window"], position[row["milestone"]]))
    return result


# --------------------------------------------------------------------------------------------------------
# 4. Streaming perplexity through the bounded cache
# --------------------------------------------------------------------------------------------------------


def cycle_tokens(token_ids: torch.LongTensor, n: int, piece: int = 65_536) -> Iterator[torch.LongTensor]:
    """A stream of ``n`` tokens that repeats ``token_ids [N]`` end to end, as pieces of ``≤ piece`` tokens.

    Lazy, so a stream of any length costs no memory: pass it to :func:`streaming_perplexity` to go past the
    corpus's size (the embedded corpus holds about 113k SmolLM2 tokens). Repeated text is easier the second
    time only for a model that can still see the first copy, which a window shorter than the corpus cannot.
    """
    token_ids = token_ids.reshape(-1)
    if token_ids.numel() == 0 or n < 0 or piece < 1:
        raise OodlensError("cycle_tokens needs a non-empty token sequence, n ≥ 0 and piece ≥ 1")
    produced = 0
    while produced < n:
        offset = produced % token_ids.numel()
        take = min(piece, token_ids.numel() - offset, n - produced)
        yield token_ids[offset : offset + take]
        produced += take


def _rechunk(
    stream: torch.LongTensor | Iterable[torch.LongTensor], chunk: int, max_tokens: int | None
) -> Iterator[torch.LongTensor]:
    """Pieces of exactly ``chunk`` tokens (the last may be shorter), at most ``max_tokens`` in all."""
    pieces = [stream] if isinstance(stream, torch.Tensor) else stream
    buffer = torch.empty(0, dtype=torch.long)
    received = 0
    for piece in pieces:
        piece = piece.reshape(-1)
        if max_tokens is not None:
            piece = piece[: max_tokens - received]
        received += piece.numel()
        buffer = torch.cat([buffer, piece])
        while buffer.numel() >= chunk:
            yield buffer[:chunk]
            buffer = buffer[chunk:]
        if max_tokens is not None and received >= max_tokens:
            break  # before pulling another piece: the stream may be endless
    if buffer.numel():
        yield buffer


@dataclass
class StreamingResult:
    """Bucketed NLL of a token stream run through a cache chunk by chunk.

    Attributes:
        method: the policy's name.
        bucket: bucket width in stream positions.
        nll_sum, n_scored: ``[n_buckets]`` float64 / int64, summed NLL and scored tokens per bucket.
        n_tokens: tokens consumed; seconds: wall time; peak_cache_tokens: most keys held by any cache layer
            after a chunk (constant once the window is full, for a bounded cache).

    ``to_dataframe()`` rows: ``{start, end, nll, ppl, n_tokens}`` per bucket.
    """

    method: str
    bucket: int
    nll_sum: np.ndarray
    n_scored: np.ndarray
    n_tokens: int
    seconds: float
    peak_cache_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else math.nan

    def ppl(self) -> float:
        """Perplexity over the whole stream."""
        return _perplexity(self.nll_sum.sum() / self.n_scored.sum()) if self.n_scored.sum() else math.nan

    def to_dataframe(self) -> pd.DataFrame:
        rows = []
        for index, (total, count) in enumerate(zip(self.nll_sum, self.n_scored, strict=True)):
            if count:
                start = index * self.bucket
                nll = float(total / count)
                rows.append(
                    dict(
                        start=start,
                        end=min(start + self.bucket, self.n_tokens),
                        nll=nll,
                        ppl=_perplexity(nll),
                        n_tokens=int(count),
                    )
                )
        return pd.DataFrame(rows, columns=["start", "end", "nll", "ppl", "n_tokens"])

    def summary(self) -> dict[str, Any]:
        """``{method, n_tokens, bucket, ppl, tokens_per_s, peak_cache_tokens,
        buckets: [{start, end, ppl}]}``; non-finite numbers are ``None``."""
        buckets = [
            {"start": int(row.start), "end": int(row.end), "ppl": _finite_or_none(row.ppl)}
            for row in self.to_dataframe().itertuples()
        ]
        return {
            "method": self.method,
            "n_tokens": self.n_tokens,
            "bucket": self.bucket,
            "ppl": _finite_or_none(self.ppl()),
            "tokens_per_s": _finite_or_none(self.tokens_per_s),
            "peak_cache_tokens": self.peak_cache_tokens,
            "buckets": buckets,
        }


class _BucketSums:
    """Running per-bucket NLL sums, grown as the stream goes (memory: one float per bucket)."""

    def __init__(self, bucket: int):
        self.bucket = bucket
        self.n_buckets = 0
        self._total = np.zeros(64)
        self._count = np.zeros(64, dtype=np.int64)

    def add(self, first_position: int, nll: torch.Tensor) -> None:
        """Add the NLL ``[C]`` of positions ``first_position, first_position + 1, ...``."""
        index = (first_position + np.arange(nll.numel())) // self.bucket
        if not index.size:
            return
        self.n_buckets = max(self.n_buckets, int(index[-1]) + 1)
        if self.n_buckets > self._total.size:  # doubling keeps a very long stream's growth cheap
            grow = max(self.n_buckets, 2 * self._total.size) - self._total.size
            self._total = np.concatenate([self._total, np.zeros(grow)])
            self._count = np.concatenate([self._count, np.zeros(grow, dtype=np.int64)])
        np.add.at(self._total, index, nll.double().numpy())
        np.add.at(self._count, index, 1)

    @property
    def total(self) -> np.ndarray:
        return self._total[: self.n_buckets]

    @property
    def count(self) -> np.ndarray:
        return self._count[: self.n_buckets]


def _stream_cache(model: PreTrainedModel, handle: PolicyHandle, max_tokens: int | None) -> Any:
    if max_tokens is None and not _bounded_cache_possible(handle.policy):
        raise OodlensError(
            f"policy {handle.policy.name!r} keeps every key (vanilla, distance limit alone, top-k), so its "
            "cache grows with the stream: use a windowed policy such as lm_infinite(), or pass max_tokens"
        )
    return _new_cache(model, handle)


def _stored_tokens(cache: Any) -> int:
    return max((0 if layer.keys is None else layer.keys.shape[-2]) for layer in cache.layers)


def streaming_perplexity(
    model: PreTrainedModel,
    token_stream: torch.LongTensor | Iterable[torch.LongTensor],
    policy: Policy,
    *,
    train_length: int,
    chunk: int = 512,
    bucket: int = DEFAULT_STREAM_BUCKET,
    max_tokens: int | None = None,
    progress: bool = True,
) -> StreamingResult:
    """Perplexity of a token stream (``[N]``, or an iterable of 1-D pieces such as :func:`cycle_tokens`) fed
    ``chunk`` tokens at a time through the policy's bounded cache, so memory stays constant however long the
    stream is. Each chunk's first token is scored with the previous chunk's last logits, so every position
    ``≥ 1`` is scored exactly as one forward over the whole stream would score it.

    Raises:
        OodlensError: the policy keeps every key (vanilla, distance limit alone, top-k) and no
            ``max_tokens`` bounds the run.
    """
    _check_train_length(train_length)
    if chunk < 1 or bucket < 1 or (max_tokens is not None and max_tokens < 2):
        raise OodlensError(
            f"chunk and bucket must be ≥ 1 and max_tokens ≥ 2, got {chunk}, {bucket}, {max_tokens}"
        )
    device = model.get_output_embeddings().weight.device
    sums = _BucketSums(bucket)
    position, peak, previous_logits = 0, 0, None
    total = (
        max_tokens
        if max_tokens is not None
        else (token_stream.numel() if isinstance(token_stream, torch.Tensor) else None)
    )
    with (
        _inference(model),
        apply_policy(model, policy, train_length=train_length) as handle,
        _progress(total, progress, "tok", f"stream {policy.name}") as bar,
    ):
        cache = _stream_cache(model, handle, max_tokens)
        started = time.perf_counter()
        for ids in _rechunk(token_stream, chunk, max_tokens):
            ids = ids.to(device)
            hidden = _forward_hidden(model, ids[None], use_cache=True, **_cache_kwargs(model, cache))[0]
            nll = _nll(model, hidden[:-1], ids[1:], chunk)
            if previous_logits is not None:
                nll = torch.cat([F.cross_entropy(previous_logits, ids[:1], reduction="none"), nll])
            sums.add(position if previous_logits is not None else 1, nll.cpu())  # position 0 has no score
            previous_logits = _logits(model, hidden[-1:])
            position += ids.numel()
            peak = max(peak, _stored_tokens(cache))
            bar.update(ids.numel())
        seconds = time.perf_counter() - started
    return StreamingResult(policy.name, bucket, sums.total, sums.count, position, seconds, peak)


# --------------------------------------------------------------------------------------------------------
# 5. Memory estimate
# --------------------------------------------------------------------------------------------------------

# Resident memory besides the weights: Python, torch, transformers (measured, see docs/evaluate.md).
RUNTIME_OVERHEAD_BYTES = 400 * 2**20
# The engine's default query block: top-k selection forms [heads, block, keys] float32 logits per block.
TOP_K_QUERY_BLOCK = 1024


def _parameter_count(info: ModelInfo) -> int:
    """Approximate weights: attention projections, a gated MLP of ≈ 8·hidden² per layer, embedding and head
    (counted twice: an over-estimate for models that tie them)."""
    attention = 2 * info.hidden_size * info.head_dim * (info.n_heads + info.n_kv_heads)
    mlp = 8 * info.hidden_size**2
    return info.n_layers * (attention + mlp) + 2 * info.vocab_size * info.hidden_size


def estimate_forward_memory(
    info: ModelInfo,
    length: int,
    batch: int = 1,
    dtype_bytes: int = 4,
    policy: Policy | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> int:
    """Rough peak resident bytes of one forward over ``[batch, length]`` tokens as this module runs it.

    Sum of: runtime overhead; weights; a full key/value cache (kept by generation; a windowed policy's bounded
    cache holds ``n_global + window`` tokens); activations of one layer (residual stream, projections, gated
    MLP, the engine's float32 accumulator); the chunked output head (``chunk × vocab`` float32 logits and
    their softmax); and, for top-k policies, the engine's ``[heads, 1024, length]`` float32 selection logits.
    Meant to be within about 2× of the truth (see docs/evaluate.md for the calibration); monotone in length.
    """
    for label, value in (("length", length), ("batch", batch), ("chunk", chunk)):
        if not isinstance(value, int) or value < 1:
            raise OodlensError(f"{label} must be a positive integer, got {value!r}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise OodlensError(f"dtype_bytes must be 1, 2, 4 or 8 (bytes per element), got {dtype_bytes!r}")
    resolved = policy.resolve(info.train_length) if policy is not None else None
    kv_tokens = length
    if resolved is not None and _bounded_cache_possible(resolved):
        kv_tokens = min(length, resolved.window + resolved.n_global)
    kv_cache = 2 * info.n_layers * info.n_kv_heads * info.head_dim * kv_tokens * batch * dtype_bytes
    projections = 2 * info.n_heads * info.head_dim + 2 * info.n_kv_heads * info.head_dim
    per_token = (11 * info.hidden_size + projections) * dtype_bytes + 4 * info.n_heads * info.head_dim
    activations = batch * length * per_token
    output_head = 2 * batch * min(chunk, length) * info.vocab_size * 4
    top_k = 0
    if resolved is not None and resolved.top_k > 0:
        top_k = 2 * batch * info.n_heads * min(TOP_K_QUERY_BLOCK, length) * length * 4
    weights = _parameter_count(info) * dtype_bytes
    return RUNTIME_OVERHEAD_BYTES + weights + kv_cache + activations + output_head + top_k


def longest_length_within(
    info: ModelInfo,
    budget_bytes: int,
    batch: int = 1,
    dtype_bytes: int = 4,
    policy: Policy | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> int:
    """The longest ``length`` whose :func:`estimate_forward_memory` fits ``budget_bytes`` (0 if none does)."""
    low, high = 0, 1
    while estimate_forward_memory(info, high, batch, dtype_bytes, policy, chunk) <= budget_bytes:
        low, high = high, high * 2
        if high > 2**40:  # the estimate does not grow (cannot happen with a finite model); stop anyway
            return low
    while high - low > 1:  # invariant: low fits (or is 0), high does not
        middle = (low + high) // 2
        if estimate_forward_memory(info, middle, batch, dtype_bytes, policy, chunk) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_CHUNK",
    "GenerationResult",
    "PasskeyResult",
    "PerplexityResult",
    "StreamingResult",
    "TRUNCATED_BASELINE",
    "continuation_scores",
    "cycle_tokens",
    "estimate_forward_memory",
    "generation_quality",
    "longest_length_within",
    "passkey_correct",
    "passkey_retrieval",
    "perplexity_by_position",
    "sequence_nll",
    "streaming_perplexity",
    "truncated_sequence_nll",
]
