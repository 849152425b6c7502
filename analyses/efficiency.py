"""Efficiency table: time and peak memory of one forward against length, vanilla vs LM-Infinite (also the
speed benchmark of LM-Infinite).

"vanilla" is the model as loaded (transformers' SDPA attention); every other method runs through the engine.
Every (method, length) case runs in its own subprocess, side by side in one run; peak memory is the
process's peak resident set during the forward (the peak is reset after the model is loaded, so loading does
not count). With ``--repeats N`` every case runs N times, interleaved, and the table keeps each case's
fastest run and its lowest peak (disturbances only ever add time). Prints seconds, average time per token
(total / n), marginal time per token (cost of the tokens added since the previous length — flat for an
O(n) method, growing for vanilla) and the ratios LM-Infinite / vanilla.

    python analyses/efficiency.py                                        # 8k, 16k, 32k
    python analyses/efficiency.py --repeats 2                            # the benchmark in docs/results.md
    python analyses/efficiency.py --lengths 131072 --methods lm-infinite  # the 128k run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common
import pandas as pd
import torch

from oodlens import plotting
from oodlens.data import corpus_tokens, load_corpus
from oodlens.evaluate import cycle_tokens
from oodlens.memory import reset_peak_memory, resident_gib
from oodlens.policies import native_or_policy


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default=None, help="comma-separated (default: L, 2L, 4L)")
    parser.add_argument("--methods", default="vanilla,lm-infinite")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the fastest is kept)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON


def one_case(settings: common.Settings, method: str, length: int) -> dict:
    """One forward of ``length`` corpus tokens under ``method`` in this process."""
    if settings.extra.threads:
        torch.set_num_threads(settings.extra.threads)
    loaded = common.model(settings)
    stream = corpus_tokens(load_corpus(), loaded.tokenizer)
    # timing does not depend on the text: past the corpus's ~113k tokens it is repeated end to end
    ids = torch.cat(list(cycle_tokens(stream, length)))[None]
    # the baseline is the model as loaded (its own SDPA attention), not the engine running vanilla
    with torch.no_grad(), native_or_policy(loaded.model, method, loaded.info.train_length):
        reset_peak_memory()
        start = time.perf_counter()
        loaded.model(ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return {"method": method, "length": length, "seconds": seconds, "peak_gib": resident_gib()[1]}


def measure(
    settings: common.Settings, methods: list[str], lengths: list[int], argv: list[str]
) -> pd.DataFrame:
    """One row per run: ``{method, length, repeat, seconds, peak_gib}``."""
    rows = []
    for repeat in range(settings.extra.repeats):
        for length in lengths:
            for method in methods:
                command = [sys.executable, __file__, *argv, "--case", f"{method}:{length}"]
                lines = (
                    subprocess.run(command, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()
                )
                rows.append(json.loads(lines[-1]) | {"repeat": repeat})
                print(
                    f"  run {repeat + 1}  {method:12s} {length:7d}: {rows[-1]['seconds']:8.1f} s  "
                    f"{rows[-1]['peak_gib']:.2f} GiB",
                    flush=True,
                )
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame) -> pd.DataFrame:
    """Best run per case, average and marginal time per token, and the LM-Infinite / vanilla ratios."""
    if "repeat" not in frame:  # results cached before repeats existed
        frame = frame.assign(repeat=0)
    frame = (
        frame.groupby(["method", "length"])
        .agg(seconds=("seconds", "min"), peak_gib=("peak_gib", "min"), runs=("repeat", "nunique"))
        .reset_index()
    )
    frame["ms_per_token"] = 1000 * frame.seconds / frame.length
    grouped = frame.groupby("method")
    frame["marginal_ms_per_token"] = 1000 * grouped.seconds.diff() / grouped.length.diff()
    if {"vanilla", "lm-infinite"} <= set(frame.method):
        wide = frame.pivot(index="length", columns="method", values=["seconds", "peak_gib"])
        ratios = pd.DataFrame(
            {
                "time_ratio": wide["seconds"]["lm-infinite"] / wide["seconds"]["vanilla"],
                "memory_ratio": wide["peak_gib"]["lm-infinite"] / wide["peak_gib"]["vanilla"],
            }
        )
        frame = frame.merge(ratios.reset_index(), on="length", how="left")
    return frame


def _more_repeats(stored: dict, asked: dict) -> bool:
    """Timings with at least the asked number of runs per case answer the question too."""
    rest = {key: value for key, value in stored.items() if key != "repeats"}
    return (
        rest == {key: value for key, value in asked.items() if key != "repeats"}
        and stored.get("repeats", 1) >= asked["repeats"]
    )


def run(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    settings = common.parse("efficiency", __doc__.splitlines()[0], add_arguments, argv, reuse_memory=False)
    if settings.extra.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {settings.extra.repeats}")
    if settings.extra.case:
        method, length = settings.extra.case.split(":")
        print(json.dumps(one_case(settings, method, int(length))))
        return pd.DataFrame()
    train = settings.train_length or common.model(settings).info.train_length
    lengths = (
        [int(n) for n in settings.extra.lengths.split(",")]
        if settings.extra.lengths
        else [train, 2 * train, 4 * train]
    )
    methods = settings.extra.methods.split(",")
    clean_argv = [a for a in argv if a != "--recompute"]
    frame = common.cached(
        settings,
        f"timings-{'-'.join(methods)}-{'-'.join(map(str, lengths))}",
        {"lengths": lengths, "methods": methods, "repeats": settings.extra.repeats},
        lambda: measure(settings, methods, lengths, clean_argv),
        serves=_more_repeats,
    )
    result = table(frame)
    common.print_table("one forward pass", result)
    if len(lengths) > 1:
        common.save(settings, plotting.plot_efficiency(result, train), "efficiency")
    return result


if __name__ == "__main__":
    run()
