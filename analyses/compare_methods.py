"""Every training-free length-extension method on one model, by what it repairs: the three OOD factors beyond
the pretraining length, perplexity, passkey retrieval, speed and cache memory.

For each method at its authors' recommended setting (RoPE rescaling with the factor that reaches
``--length``): perplexity of one forward over ``--length`` tokens (default 4 L) with that forward's time;
the three factors from a capture of ``--capture-length`` tokens (default 2 L); passkey retrieval at
``--passkey-lengths`` (default 1.5 L and 2 L) × ``--passkey-depths``; time per decoding step and cache
memory after ``--length`` tokens of context (a cache filled to that length, see
:mod:`oodlens.evaluate.speed`); the RULER-style ``--tasks`` (default all five) with ``--task-samples`` prompts
each (default 4) at ``--task-length`` (default 1.5 L) for every method and the baseline, mean score with its
interval. Vanilla's in-distribution values (logits and entropy within L, passkey at L / 2) are the reference
of the repair map. Each method's results, and each task's, are cached on their own, so a run that stops
resumes where it was.

    python analyses/compare_methods.py                  # SmolLM2, 32k: about 2 h on 2 cores, tasks aside
    python analyses/compare_methods.py --tasks ''       # without the tasks
    python analyses/compare_methods.py --quick          # tiny random model, seconds
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import pandas as pd

from oodlens import plotting
from oodlens.evaluate import TRUNCATED_BASELINE, MethodComparison, decode_speed, task_accuracy
from oodlens.evaluate.comparison import (
    DEFAULT_DECODE_STEPS,
    measure_baseline,
    measure_method,
    measure_reference,
)
from oodlens.evaluate.tasks import DEFAULT_TASKS
from oodlens.policies import Policy, policy_by_name
from oodlens.storage import write_json

METHODS = (
    "vanilla",
    "lm-infinite",
    "streaming-llm",
    "self-extend",
    "rerope",
    "string",
    "dual-chunk",
    "pi",
    "ntk",
    "yarn",
)
RESCALED = ("pi", "ntk", "yarn", "llama3-rope")
# a method's results are a JSON dict in the cache (common.cached stores DataFrames by default)
JSON_RESULT = {
    "suffix": ".result.json",
    "write": lambda value, path: write_json(path, value),
    "read": lambda path: json.loads(Path(path).read_text()),
}


def add_arguments(parser) -> None:
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--length", type=int, default=None, help="perplexity window (default 4 L)")
    parser.add_argument("--capture-length", type=int, default=None, help="factor capture (default 2 L)")
    parser.add_argument("--passkey-lengths", default=None, help="comma-separated (default 1.5 L, 2 L)")
    parser.add_argument("--passkey-depths", default="0.5", help="comma-separated needle depths")
    parser.add_argument("--bucket", type=int, default=None, help="perplexity bucket (default L / 8)")
    parser.add_argument("--tasks", default=None, help="comma-separated; '' for none (default: all five)")
    parser.add_argument("--task-length", type=int, default=None, help="default 1.5 L (quick: 1200)")
    parser.add_argument("--task-samples", type=int, default=None, help="prompts per task (default 4)")


def recommended(name: str, length: int) -> Policy:
    """``name`` at its authors' setting; RoPE rescaling stretched to reach ``length`` (f = length / L)."""
    return policy_by_name(name, target_length=length) if name in RESCALED else policy_by_name(name)


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("compare_methods", __doc__.splitlines()[0], add_arguments, argv)
    loaded = common.model(settings)
    model, tokenizer, train = loaded.model, loaded.tokenizer, loaded.info.train_length
    extra = settings.extra
    length = extra.length or 4 * train
    capture_length = extra.capture_length or 2 * train
    bucket = extra.bucket or max(train // 8, 1)
    # quick runs: a tiny L is shorter than any passkey prompt, so the lengths are the shortest that fit
    passkey_lengths = _ints(extra.passkey_lengths) or [
        settings.scale(3 * train // 2, 400),
        settings.scale(2 * train, 480),
    ]
    within = settings.scale(train // 2, 340)
    depths = [float(depth) for depth in extra.passkey_depths.split(",")]
    names = [name.strip() for name in extra.methods.split(",")]
    if "vanilla" not in names:
        names.insert(0, "vanilla")  # the repair map's reference
    ids = common.windows(settings, length)
    params = {"length": length, "capture": capture_length, "passkey": passkey_lengths, "depths": depths}
    shared = {"train_length": train, "passkey_lengths": passkey_lengths, "depths": depths, "bucket": bucket}

    def per_method(name: str) -> dict:
        policy = recommended(name, length)
        return common.cached(
            settings,
            name,
            params | {"bucket": bucket},
            lambda: measure_method(model, tokenizer, ids, policy, capture_length=capture_length, **shared),
            **JSON_RESULT,
        )

    results = {name: per_method(name) for name in names}
    baseline = common.cached(
        settings,
        TRUNCATED_BASELINE,
        params | {"bucket": bucket},
        lambda: measure_baseline(model, tokenizer, ids, **shared),
        **JSON_RESULT,
    )
    reference = common.cached(
        settings,
        "vanilla-within",
        {"passkey": [within], "depths": depths},
        lambda: {
            "vanilla": measure_reference(model, tokenizer, train_length=train, length=within, depths=depths)
        },
        **JSON_RESULT,
    )
    speed = common.cached(
        settings,
        "decode",
        {"length": length, "steps": DEFAULT_DECODE_STEPS, "methods": names},
        lambda: decode_speed(
            model,
            [recommended(name, length) for name in names],
            [length],
            steps=DEFAULT_DECODE_STEPS,
            progress=False,
        ).to_dataframe(),
    )
    task_length = extra.task_length or settings.scale(3 * train // 2, 1200)
    task_samples = extra.task_samples or settings.scale(4, 1)
    policies = [recommended(name, length) for name in names]

    def per_task(task: str) -> pd.DataFrame:
        return common.cached(
            settings,
            f"tasks-{task}",
            # the comparison's length too: the rescaled methods (PI, NTK, YaRN) are stretched to it
            {"methods": names, "length": length, "task_length": task_length, "samples": task_samples},
            lambda: task_accuracy(
                model,
                tokenizer,
                policies,
                [task],
                lengths=[task_length],
                n_samples=task_samples,
                train_length=train,
            ).to_dataframe(),
        )

    quick_tasks = "niah_single,variable_tracking"  # two kinds of task, in seconds
    listed = extra.tasks if extra.tasks is not None else settings.scale(",".join(DEFAULT_TASKS), quick_tasks)
    tasks = [task.strip() for task in listed.split(",") if task.strip()]
    task_rows = pd.concat([per_task(task) for task in tasks], ignore_index=True) if tasks else None
    comparison = MethodComparison(
        results, baseline, reference["vanilla"], train, length, within, passkey_lengths, speed, task_rows
    )
    figure = plotting.plot_perplexity_by_position(comparison.perplexity_frame(), train)
    common.save(settings, figure, "compare_perplexity_by_position")
    table, repairs = comparison.table(), comparison.repairs()
    common.save(settings, plotting.plot_repair_map(repairs), "compare_repair_map")
    common.print_table(f"methods on {settings.model} (train length {train}, {length} tokens)", table)
    table.to_csv(settings.cache / "table.csv", index=False)
    if task_rows is not None:
        task_result = comparison.task_result()
        task_table = task_result.accuracy()
        common.print_table(f"tasks at {task_length} tokens (mean score, 95 % interval)", task_table)
        task_table.to_csv(settings.cache / "tasks.csv", index=False)
        tasks_figure = plotting.plot_method_comparison(
            task_result.metric_frame(), facet=True, ylabel="mean score", fractions=True
        )
        common.save(settings, tasks_figure, "compare_tasks")
    repairs.to_csv(settings.cache / "repairs.csv", index=False)
    return table


def _ints(text: str | None) -> list[int]:
    return [int(part) for part in text.split(",")] if text else []


if __name__ == "__main__":
    run()
