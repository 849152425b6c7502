"""RULER-style tasks under every method: greedy answers to :mod:`oodlens.tasks` prompts, scored with the
task's own metric, with the truncated baseline beside every method and an interval on every accuracy.

Prompts of one task and length come from :func:`oodlens.tasks.generate` (deterministic for a seed, sized with
the model's tokenizer). The filler before a needle is the same for every prompt up to its depth, so prompts
run in order of depth and the start they share (below the methods' window) runs once under vanilla; each
prompt continues from its own copy (:meth:`SharedPrefix.fork`). An answer stops as soon as its score is
final (:func:`oodlens.tasks.settled`: every reference answer found, which RULER's string match can only
confirm); its ``generated`` text ends there, its score is the one the full ``tokens_to_generate`` would give.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel

from ..display import Displayed
from ..errors import OodlensError, check_count
from ..models import train_length_of
from ..policies import Policy
from ..stats import Estimate
from ..tasks import generate, score, settled
from .generation import answer_prompt
from .prefix import SharedPrefix, shared_length
from .scoring import inference, methods_of, progress_bar

DEFAULT_TASKS = ("niah_single", "niah_multikey", "variable_tracking", "common_words", "frequent_words")


@dataclass(repr=False)
class TaskResult(Displayed):
    """Rows ``{method, task, length, sample, depth, score, prompt_tokens, generated, answers}``; ``score`` is
    the task's metric in [0, 1] (RULER's string match; 0/1 for passkey and single needles)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        return {"prompts": len(self.rows), "tasks": len({row["task"] for row in self.rows})}

    def display_rows(self) -> dict[str, dict[str, Any]]:
        table = self.accuracy()
        return {
            method: {f"{row.task} @ {row.length}": row.value for row in rows.itertuples()}
            for method, rows in table.groupby("method", sort=False)
        }

    def to_dataframe(self) -> pd.DataFrame:
        columns = ["method", "task", "length", "sample", "depth", "score", "prompt_tokens", "generated"]
        return pd.DataFrame(self.rows, columns=[*columns, "answers"])

    def estimates(self) -> dict[tuple[str, str, int], Estimate]:
        """Per (method, task, length): the mean score with its 95 % Wilson interval
        (:meth:`~oodlens.stats.Estimate.score_mean`: exact for 0/1 scores, conservative for partial ones)."""
        cells = self.to_dataframe().groupby(["method", "task", "length"], sort=False)
        return {
            (method, task, int(length)): Estimate.score_mean(rows["score"])
            for (method, task, length), rows in cells
        }

    def accuracy(self) -> pd.DataFrame:
        """method, task, length, value (mean score), low, high, n, interval (wilson; wilson-bound for partial
        scores)."""
        rows = [
            {"method": method, "task": task, "length": length, "value": e.value, "low": e.low, "high": e.high,
             "n": e.n, "interval": e.method}
            for (method, task, length), e in self.estimates().items()
        ]  # fmt: skip
        columns = ["method", "task", "length", "value", "low", "high", "n", "interval"]
        return pd.DataFrame(rows, columns=columns)

    def metric_frame(self) -> pd.DataFrame:
        """Tidy ``[method, metric, value, low, high, n]``, one metric per ``task @ length``: what
        :func:`oodlens.plotting.plot_method_comparison` draws."""
        accuracy = self.accuracy()
        accuracy["metric"] = accuracy["task"] + " @ " + accuracy["length"].astype(str)
        return accuracy[["method", "metric", "value", "low", "high", "n"]]

    def summary(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """``{method: {task: {str(length): Estimate.to_dict()}}}``."""
        out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for (method, task, length), estimate in self.estimates().items():
            out.setdefault(method, {}).setdefault(task, {})[str(length)] = estimate.to_dict()
        return out


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: Any,
    policies: Sequence[Policy],
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    lengths: Sequence[int],
    n_samples: int = 20,
    seed: int = 0,
    train_length: int | None = None,
    truncated_baseline: bool = True,
    corpus: Any = None,
    share_prefix: bool = True,
    progress: bool = True,
) -> TaskResult:
    """Greedy answers of every method to ``n_samples`` prompts of each task at each length, scored.

    ``tasks``: names of :data:`oodlens.tasks.TASKS` or RULER's (:data:`oodlens.tasks.RULER_TASKS`);
    ``corpus`` is the haystack of ``niah_essay``. :data:`TRUNCATED_BASELINE` answers from the prompt's last
    ``train_length`` tokens (the question stays), which drops a needle further back than that.
    """
    train_length = train_length_of(model, train_length)
    check_count("n_samples", n_samples, minimum=1)
    if not tasks or not lengths:
        raise OodlensError("task_accuracy needs at least one task and one length")
    methods = methods_of(policies, truncated_baseline)
    # the truncated baseline's prompt begins with the haystack only when nothing is cut (it is vanilla then)
    continuing = [method for method in methods if not method.truncated]
    prompts = {
        (task, length): generate(task, tokenizer, length, n_samples, seed, corpus)
        for task in tasks
        for length in lengths
    }
    result = TaskResult()
    answers: dict[tuple, torch.LongTensor] = {}
    total = len(methods) * n_samples * len(prompts)
    with inference(model), progress_bar(total, progress, "prompt", "tasks") as bar:
        for (task, length), samples in prompts.items():
            base = SharedPrefix(model, train_length)
            for sample in sorted(samples, key=lambda s: (s.depth is None, s.depth or 0.0)):
                full = torch.tensor(sample.input_ids, dtype=torch.long)
                prefix = None
                if share_prefix:
                    # the start most methods would continue from, were it already run (the rest run alone)
                    limit = full.numel() - 1
                    worth = shared_length(continuing, train_length, limit, held=limit)
                    shared = min(sample.shared_prefix_tokens, worth)
                    if shared > 0:
                        base.reach(full, shared)
                    prefix = base.fork()
                # a full string-match score is final: generating on could not change it
                final = functools.partial(settled, task, answers=sample.answers)
                ttg = sample.max_new_tokens
                replies = answer_prompt(
                    model, tokenizer, methods, full, prefix, ttg, train_length, answers, settled=final
                )
                for method, seen, generated in replies:
                    result.rows.append(dict(
                        method=method.name, task=task, length=length, sample=sample.index, depth=sample.depth,
                        score=score(task, generated, sample.answers), prompt_tokens=seen,
                        generated=generated, answers=list(sample.answers),
                    ))  # fmt: skip
                    bar.update()
    order = {method.name: index for index, method in enumerate(methods)}
    result.rows.sort(key=lambda row: order[row["method"]])
    return result
