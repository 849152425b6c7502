"""``python -m oodlens.compare RUN_DIR… --out DIR``: one comparison report from many probe runs.

Reads each run with :func:`oodlens.probe.collect.collect` (a folder that is not a finished, valid report is a
one-line error naming it, and nothing is written), then writes DIR atomically: ``table.csv`` (the tidy rows:
run, model, length, method, metric, value, low, high, n), ``comparison.md`` (a table per metric, a column per
run, every value with its 95 % interval and n) and ``figures/`` (the headline metrics side by side, with
intervals).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import plotting
from .display import format_number
from .errors import OodlensError
from .probe.collect import collect
from .storage import write_folder
from .tasks import RULER_TASKS, TASKS

COMPARISON_KIND = "comparison"
HEADLINE = ("ppl_beyond_train_length", "passkey@", "rouge_l@")  # the metrics drawn (prefixes), and tasks


def write_comparison(runs: list[str], out: str | Path, *, overwrite: bool = False) -> Path:
    """Collect ``runs`` (folders or glob patterns) and write the comparison folder ``out``; returns it."""
    frame = collect(runs)
    frame["label"] = frame["run"].map(run_labels(frame))

    def fill(folder: Path) -> None:
        frame.drop(columns="label").to_csv(folder / "table.csv", index=False)
        figures = folder / "figures"
        figures.mkdir()
        names = []
        tasks = {*TASKS, *RULER_TASKS}
        task_metrics = {m for m in frame["metric"].unique() if m.split("@")[0] in tasks}
        drawn = [m for m in frame["metric"].unique() if m.startswith(HEADLINE) or m in task_metrics]
        for metric in sorted(drawn):
            rows = frame[frame["metric"] == metric]
            panels = rows.assign(metric=metric + "\n" + rows["label"])  # one panel per run
            task = metric in task_metrics
            fig = plotting.plot_method_comparison(
                panels[["method", "metric", "value", "low", "high", "n"]],
                facet=True,
                ylabel="mean score" if task else None,
                fractions=task,
            )
            name = metric.replace("@", "_at_")
            plotting.save_figure(fig, figures / name)
            plt.close(fig)
            names.append(name)
        (folder / "comparison.md").write_text(_markdown(frame, runs, names))

    return write_folder(out, fill, kind=COMPARISON_KIND, overwrite=overwrite)


def run_labels(frame: pd.DataFrame) -> dict[str, str]:
    """A distinct label per run of a collected frame: ``model @length``, with the run folder's name beside it
    where runs share that (its whole path where names repeat too), so two runs never merge in a table cell or
    in a figure's bars."""
    runs = frame.drop_duplicates("run")
    short = dict(zip(runs["run"], runs["model"] + " @" + runs["length"].astype(str), strict=True))
    labels = short
    for detail in (lambda run: Path(run).name, str):  # the folder's name; its path where names repeat too
        counts = Counter(labels.values())
        labels = {
            run: label if counts[label] == 1 else f"{short[run]} ({detail(run)})"
            for run, label in labels.items()
        }
    return labels


def _markdown(frame: pd.DataFrame, runs: list[str], figures: list[str]) -> str:
    frame = frame.assign(cell=frame.apply(_cell, axis=1))
    lines = [
        "# Comparison of probe runs",
        "",
        f"{frame['run'].nunique()} runs ({', '.join(map(str, runs))}). Each cell: value [95 % interval], n "
        "(windows for perplexity and factors, prompts for passkey, windows for generation scores).",
    ]
    for metric, rows in frame.groupby("metric", sort=False):
        lines += ["", f"## {metric}", "", _table(rows)]
    lines += ["", "## Figures", ""] + [f"![{name}](figures/{name}.png)" for name in figures]
    return "\n".join(lines) + "\n"


def _cell(row: pd.Series) -> str:
    text = format_number(None if pd.isna(row["value"]) else float(row["value"]))
    if pd.notna(row["low"]) and pd.notna(row["high"]):
        text += f" [{format_number(float(row['low']))}, {format_number(float(row['high']))}]"
    n = row["n"]
    return text + (f", n={int(n)}" if pd.notna(n) else "")


def _table(rows: pd.DataFrame) -> str:
    """Methods × runs (their labels) of one metric, as a Markdown table."""
    repeated = rows[rows.duplicated(["method", "label"], keep=False)]
    if not repeated.empty:  # never aggregated silently: one run has two values for one method and metric
        row = repeated.iloc[0]
        raise OodlensError(
            f"run {row['run']} has several rows for {row['method']} at {row['metric']!r}: its table.csv or "
            "summary is not one value per method and metric; rerun it"
        )
    table = rows.pivot(index="method", columns="label", values="cell")
    table = table.reindex(index=rows["method"].unique(), columns=rows["label"].unique())  # order of the runs
    head = "| method | " + " | ".join(map(str, table.columns)) + " |"
    rule = "|---" * (len(table.columns) + 1) + "|"
    body = [
        f"| {method} | " + " | ".join("–" if pd.isna(cell) else str(cell) for cell in cells) + " |"
        for method, cells in table.iterrows()
    ]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oodlens.compare",
        description="One comparison report (table.csv, comparison.md, figures/) from many probe report "
        "folders.",
    )
    parser.add_argument("runs", nargs="+", help="report folders or glob patterns (e.g. 'runs/*')")
    parser.add_argument("--out", required=True, help="the comparison folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison folder")
    args = parser.parse_args(argv)
    try:
        folder = write_comparison(args.runs, args.out, overwrite=args.overwrite)
    except OodlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}/comparison.md, table.csv and figures/")
    return 0


def main_entry() -> None:
    """The ``oodlens-compare`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
