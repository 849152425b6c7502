"""Greedy generation under a policy: passkey retrieval (the paper's Table 2) and generation quality after
long context (Table 3). Windowed policies decode with the bounded cache, so memory stays flat."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from ..data import passkey_prompt
from ..display import Displayed
from ..errors import OodlensError
from ..models import train_length_of
from ..policies import Policy, PolicyHandle, apply_policy, vanilla
from ..stats import Estimate
from .prefix import SharedPrefix, Trunks, continues_prefix, shared_length
from .scoring import (
    Method,
    cache_kwargs,
    inference,
    methods_of,
    new_cache,
    past_the_pretraining_length,
    progress_bar,
)

FIRST_NUMBER = re.compile(r"\d+")


def generate_greedy(
    model: PreTrainedModel,
    prompt: torch.LongTensor,
    max_new_tokens: int,
    *,
    cache: Any = None,
    pad_token_id: int | None = None,
    until: Callable[[torch.LongTensor], bool] | None = None,
) -> torch.LongTensor:
    """The ``≤ max_new_tokens`` ids ``model.generate`` picks greedily after ``prompt [T]``, decoding into
    ``cache`` (``None``: transformers' dynamic cache; a policy handle's ``new_cache()`` for constant memory),
    with the cache keyword this transformers version accepts; it stops early once ``until(new ids)`` holds."""
    device = model.get_output_embeddings().weight.device
    ids = prompt.reshape(-1).to(device)[None]
    stop = StoppingCriteriaList([_Until(until, ids.shape[1])]) if until is not None else None
    with inference(model), past_the_pretraining_length():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            stopping_criteria=stop,
            **(cache_kwargs(model, cache) if cache is not None else {}),
        )
    return output[0, ids.shape[1] :].cpu()


class _Until(StoppingCriteria):
    """Stops ``model.generate`` once ``until`` holds for the ids generated after ``prompt_length``."""

    def __init__(self, until: Callable[[torch.LongTensor], bool], prompt_length: int):
        self.until, self.prompt_length = until, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [self.until(row[self.prompt_length :].cpu()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def greedy(
    model: PreTrainedModel,
    handle: PolicyHandle,
    prompt: torch.LongTensor,
    max_new_tokens: int,
    pad_token_id: int | None,
    prefix: SharedPrefix | None = None,
    until: Callable[[torch.LongTensor], bool] | None = None,
) -> torch.LongTensor:
    """:func:`generate_greedy` under the applied policy, continuing from ``prefix`` when the prompt begins
    with it; windowed policies decode with the bounded cache, so memory stays flat however long the prompt."""
    continues = prefix is not None and prefix.begins(prompt)
    cache = prefix.cache_for(handle) if continues else new_cache(model, handle)
    return generate_greedy(model, prompt, max_new_tokens, cache=cache, pad_token_id=pad_token_id, until=until)


def _answer_key(policy: Policy, prompt: torch.LongTensor, max_new_tokens: int, train_length: int) -> tuple:
    """What a greedy answer depends on: the prompt, and the policy unless it attends as vanilla over every
    position that predicts a token (then its answer is vanilla's, e.g. LM-Infinite on a prompt that fits in
    its window, or the truncated baseline of such a prompt)."""
    last_query = prompt.numel() + max_new_tokens - 2
    as_vanilla = last_query < policy.vanilla_prefix(train_length)
    return (vanilla() if as_vanilla else policy, tuple(prompt.tolist()))


def greedy_jobs(
    model: PreTrainedModel,
    jobs: Sequence[tuple[Method, torch.LongTensor]],
    text: torch.LongTensor,
    prefix: SharedPrefix | None,
    max_new_tokens: int,
    pad_token_id: int | None,
    train_length: int,
    answers: dict[tuple, torch.LongTensor],
    trunks: tuple[Trunks, int] | None = None,
    until: Callable[[torch.LongTensor], bool] | None = None,
) -> list[torch.LongTensor]:
    """The greedy answer to each ``(method, prompt)`` job, memoised in ``answers`` (see :func:`_answer_key`;
    the calls that share it pass the same ``until`` for a prompt), each stopping early once
    ``until(new ids)`` holds.

    With a ``prefix``, the jobs to run whose prompts begin ``text [T]`` share the start of it that saves the
    most (:func:`~.prefix.shared_length`, counting what ``prefix`` already holds; it is extended to that
    start, or restarted if it holds more); jobs that do not attend as vanilla over it run alone. With
    ``trunks = (trunks, n)`` instead, each such job continues from its own policy's trunk holding
    ``text[:n]``.
    """
    keys = [_answer_key(method.policy, ids, max_new_tokens, train_length) for method, ids in jobs]
    todo: dict[tuple, tuple[Method, torch.LongTensor]] = {}
    for key, job in zip(keys, jobs, strict=True):
        if key not in answers:
            todo.setdefault(key, job)
    if trunks is not None:
        if prefix is not None:
            raise OodlensError("greedy_jobs takes a shared prefix or trunks, not both")
        settings = (max_new_tokens, pad_token_id, train_length, until)
        return _trunk_jobs(model, todo, keys, text, trunks, settings, answers)
    starts = [(method, ids) for method, ids in todo.values() if torch.equal(ids, text[: ids.numel()])]
    if prefix is not None and starts:
        limit = min(ids.numel() for _, ids in starts) - 1
        held = prefix.length if torch.equal(text[: prefix.length], prefix.ids) else 0
        prefix.reach(text, shared_length([method for method, _ in starts], train_length, limit, held))
    for key, (method, ids) in todo.items():
        own = prefix if prefix is not None and continues_prefix(method, train_length, prefix.length) else None
        with apply_policy(model, method.policy, train_length=train_length) as handle:
            answers[key] = greedy(model, handle, ids, max_new_tokens, pad_token_id, own, until)
    return [answers[key] for key in keys]


def _trunk_jobs(
    model: PreTrainedModel,
    todo: dict[tuple, tuple[Method, torch.LongTensor]],
    keys: list[tuple],
    text: torch.LongTensor,
    trunks: tuple[Trunks, int],
    settings: tuple[int, int | None, int, Callable[[torch.LongTensor], bool] | None],
    answers: dict[tuple, torch.LongTensor],
) -> list[torch.LongTensor]:
    """:func:`greedy_jobs` with trunks: a job whose prompt begins ``text`` continues from the trunk of the
    policy it answers under (the key's), holding ``text[:n]``; ``settings``: max_new_tokens, pad_token_id,
    train_length, until."""
    (held, shared), (max_new_tokens, pad_token_id, train_length, until) = trunks, settings
    for key, (_, ids) in todo.items():
        begins = torch.equal(ids, text[: ids.numel()]) and shared < ids.numel()
        trunk = held.up_to(key[0], text, shared) if begins else None
        with apply_policy(model, key[0], train_length=train_length) as handle:
            answers[key] = greedy(model, handle, ids, max_new_tokens, pad_token_id, trunk, until)
    return [answers[key] for key in keys]


def answer_prompt(
    model: PreTrainedModel,
    tokenizer: Any,
    methods: Sequence[Method],
    prompt: torch.LongTensor,
    prefix: SharedPrefix | None,
    max_new_tokens: int,
    train_length: int,
    answers: dict[tuple, torch.LongTensor],
    trunks: tuple[Trunks, int] | None = None,
    settled: Callable[[str], bool] | None = None,
) -> list[tuple[Method, int, str]]:
    """Each method's greedy answer to ``prompt [T]`` as ``(method, prompt tokens it saw, text)``: the
    truncated baseline sees only the last ``train_length`` tokens (the question stays), every other method
    all of them (see :func:`greedy_jobs` for ``prefix``, ``trunks`` and ``answers``). Each answer stops
    early once ``settled(text so far)`` holds (a score that more text cannot change)."""
    jobs = [(method, prompt[-train_length:] if method.truncated else prompt) for method in methods]
    pad = pad_token_id_of(tokenizer)

    def text(new_ids: torch.LongTensor) -> str:
        return tokenizer.decode(new_ids, skip_special_tokens=True)

    until = (lambda new_ids: settled(text(new_ids))) if settled is not None else None
    outputs = greedy_jobs(
        model, jobs, prompt, prefix, max_new_tokens, pad, train_length, answers, trunks, until
    )
    return [
        (method, ids.numel(), text(new_ids)) for (method, ids), new_ids in zip(jobs, outputs, strict=True)
    ]


def pad_token_id_of(tokenizer: Any) -> int | None:
    """The id generation pads with: the tokenizer's pad token, else its end-of-sequence token."""
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


@dataclass(repr=False)
class PasskeyResult(Displayed):
    """Passkey rows: ``{method, length, depth, sample, passkey, prompt_tokens, needle_seen, generated,
    correct}``.

    ``length`` and ``depth`` are the requested cell; ``prompt_tokens`` is the prompt's real size (at most
    ``length``; for :data:`TRUNCATED_BASELINE`, at most ``train_length``). ``needle_seen`` is False only for
    the truncated baseline when its context starts after the whole needle: that row is a miss scored without
    generating (``generated`` empty).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        return {"prompts": len(self.rows), "methods": len({row["method"] for row in self.rows})}

    def display_rows(self) -> dict[str, dict[str, Any]]:
        return {
            method: {f"accuracy @ {length}": value for length, value in by_length.items()}
            for method, by_length in self.summary().items()
        }

    def to_dataframe(self) -> pd.DataFrame:
        columns = [
            "method", "length", "depth", "sample", "passkey", "prompt_tokens", "needle_seen", "generated",
            "correct",
        ]  # fmt: skip
        return pd.DataFrame(self.rows, columns=columns)

    def accuracy(self, by_depth: bool = False) -> pd.DataFrame:
        """Accuracy (fraction correct), prompts answered right (``correct``) and sample count ``n`` by
        (method, length[, depth])."""
        keys = ["method", "length", "depth"] if by_depth else ["method", "length"]
        table = self.to_dataframe().groupby(keys, sort=False)["correct"]
        return table.agg(accuracy="mean", correct="sum", n="size").reset_index()

    def summary(self) -> dict[str, dict[str, float]]:
        """``{method: {str(length): accuracy}}``."""
        summary: dict[str, dict[str, float]] = {}
        for row in self.accuracy().itertuples():
            summary.setdefault(row.method, {})[str(row.length)] = float(row.accuracy)
        return summary

    def intervals(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{method: {str(length): Estimate}}``: accuracy over the length's prompts (its depths and samples)
        with the 95 % Wilson interval and n, as :meth:`Estimate.to_dict`."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for row in self.accuracy().itertuples():
            estimate = Estimate.proportion(int(row.correct), int(row.n))
            out.setdefault(row.method, {})[str(row.length)] = estimate.to_dict()
        return out


def passkey_retrieval(
    model: PreTrainedModel,
    tokenizer: Any,
    policies: Sequence[Policy],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    samples_per_cell: int = 1,
    train_length: int | None = None,
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
    in its window) gives vanilla's answer, which is generated once. With ``share_prefix`` the prompts, whose
    intro and filler are the same up to their needles, run that start once per method: each method's trunk
    grows from one needle to the next and each prompt continues from a copy of it (the same answers up to
    float rounding; methods whose result depends on how a sequence is split into calls run every prompt
    alone).
    """
    train_length = train_length_of(model, train_length)
    if samples_per_cell < 1 or max_new_tokens < 1:
        raise OodlensError("samples_per_cell and max_new_tokens must be ≥ 1")
    methods = methods_of(policies, truncated_baseline)
    cells = list(
        dict.fromkeys(  # a length or depth given twice is one cell
            (length, depth, sample)
            for length in lengths
            for depth in depths
            for sample in range(samples_per_cell)
        )
    )
    prompts = {
        cell: passkey_prompt(tokenizer, cell[0], cell[1], seed=_passkey_seed(seed, *cell)) for cell in cells
    }
    result = PasskeyResult()
    answers: dict[tuple, torch.LongTensor] = {}
    trunks = Trunks(model, train_length)
    # every prompt's intro and filler up to its needle is the same text, whatever its length: in the needles'
    # order each method's trunk only grows (rows are sorted back into the cells' order below)
    order = sorted(prompts, key=lambda cell: prompts[cell].needle_position)
    with inference(model), progress_bar(len(methods) * len(cells), progress, "prompt", "passkey") as bar:
        for length, depth, sample in order:
            prompt = prompts[length, depth, sample]
            shared = (trunks, prompt.needle_position) if share_prefix else None
            # a truncated context that starts after the whole needle cannot hold the random key: scored a miss
            # without running the model (its answer would be a guess at 1 in 90,000)
            cut = prompt.needle_end <= prompt.length - train_length
            asked = [method for method in methods if not (cut and method.truncated)]
            replies = answer_prompt(
                model, tokenizer, asked, prompt.input_ids, None, max_new_tokens, train_length, answers, shared
            )
            replies += [(method, train_length, None) for method in methods if cut and method.truncated]
            for method, seen, generated in replies:
                result.rows.append(dict(
                    method=method.name, length=length, depth=depth, sample=sample, passkey=prompt.passkey,
                    prompt_tokens=seen, needle_seen=generated is not None, generated=generated or "",
                    correct=generated is not None and passkey_correct(generated, prompt.passkey),
                ))  # fmt: skip
                bar.update()
    method_rank = {method.name: index for index, method in enumerate(methods)}
    cell_rank = {cell: index for index, cell in enumerate(cells)}
    result.rows.sort(
        key=lambda row: (method_rank[row["method"]], cell_rank[row["length"], row["depth"], row["sample"]])
    )
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


@dataclass(repr=False)
class GenerationResult(Displayed):
    """Rows ``{method, window, milestone, bleu, rouge_l, generated, reference}``.

    After the first ``milestone`` tokens of window number ``window``, ``generated`` is the model's greedy
    continuation and ``reference`` the real next ``new_tokens`` tokens, both detokenised.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        return {"continuations": len(self.rows), "methods": len({row["method"] for row in self.rows})}

    def display_rows(self) -> dict[str, dict[str, Any]]:
        return {
            method: {
                f"ROUGE-L @ {milestone}": scores["rouge_l"] for milestone, scores in by_milestone.items()
            }
            for method, by_milestone in self.summary().items()
        }

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

    def intervals(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """``{method: {str(milestone): {"bleu": Estimate, "rouge_l": Estimate}}}``: the mean over windows with
        its 95 % bootstrap interval (NaN ends for one window) and n, as :meth:`Estimate.to_dict`."""
        out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for (method, milestone), rows in self.to_dataframe().groupby(["method", "milestone"], sort=False):
            out.setdefault(method, {})[str(milestone)] = {
                score: Estimate.mean(rows[score].to_numpy(dtype=float)).to_dict()
                for score in ("bleu", "rouge_l")
            }
        return out


def generation_quality(
    model: PreTrainedModel,
    tokenizer: Any,
    windows_or_tokens: torch.LongTensor,
    policies: Sequence[Policy],
    *,
    milestones: Sequence[int],
    new_tokens: int = 100,
    train_length: int | None = None,
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
    train_length = train_length_of(model, train_length)
    windows = windows_or_tokens[None] if windows_or_tokens.dim() == 1 else windows_or_tokens
    too_long = [m for m in milestones if m < 1 or m + new_tokens > windows.shape[1]]
    if too_long or not milestones:
        raise OodlensError(
            f"milestones must lie in [1, {windows.shape[1] - new_tokens}] so that {new_tokens} real tokens "
            f"follow each one in windows of {windows.shape[1]} tokens; got {list(milestones)}"
        )
    methods = methods_of(policies, truncated_baseline=False)
    result = GenerationResult()
    pad_token_id = pad_token_id_of(tokenizer)
    total = len(methods) * len(windows) * len(milestones)
    with inference(model), progress_bar(total, progress, "continuation", "generation") as bar:
        for index, window in enumerate(windows):
            prefix = SharedPrefix(model, train_length) if share_prefix else None
            answers: dict[tuple, torch.LongTensor] = {}
            for milestone in sorted(milestones):  # ascending, so the shared prefix only grows
                jobs = [(method, window[:milestone]) for method in methods]
                outputs = greedy_jobs(
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
