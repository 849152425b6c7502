"""Many probe runs, one table: read report folders back, checked against the shipped JSON Schema.

A probe run is one process writing one folder, so a sweep is many runs (a Slurm job array, or any batch
system; docs/sweeps.md) and :func:`collect` gathers their ``summary.json`` files into one tidy DataFrame.
:func:`read_summary` is the one reader: it refuses a folder that is not a finished, valid report with an error
that names the folder, so a damaged run in a sweep is reported, never silently mixed in. :func:`resume_state`
tells ``--resume`` whether a folder already holds this run.
"""

from __future__ import annotations

import functools
import glob
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pandas as pd

from ..capture import factor_estimates
from ..errors import OodlensError
from ..storage import folder_kind, json_ready
from .config import ProbeConfig
from .report import REPORT_KIND

SCHEMA_PATH = Path(__file__).with_name("summary.schema.json")
COLUMNS = ["run", "model", "length", "train_length", "method", "metric", "value", "low", "high", "n"]


@functools.cache
def summary_schema() -> dict[str, Any]:
    """The JSON Schema of ``summary.json`` shipped in the package (``oodlens/probe/summary.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_summary(summary: Any, where: str = "summary") -> None:
    """Raise a one-line :class:`OodlensError` naming ``where``, the first offending key and the rule it
    breaks, unless ``summary`` follows the schema."""
    validator = jsonschema.Draft202012Validator(summary_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(summary))
    if error is not None:
        key = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise OodlensError(f"{where} does not follow the summary schema at {key}: {error.message[:200]}")


def read_summary(folder: str | Path) -> dict[str, Any]:
    """The validated ``summary.json`` of the report folder ``folder``.

    Raises:
        OodlensError: naming the folder, when it is missing, not a report oodlens finished writing, or holds a
            damaged or invalid summary."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OodlensError(f"{folder}: no such report folder")
    if folder_kind(folder) != REPORT_KIND:
        raise OodlensError(
            f"{folder}: not a finished oodlens report (no report marker: a run still writing, interrupted, "
            "or another folder); rerun it, or leave it out"
        )
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except OSError as error:
        raise OodlensError(f"{folder}: cannot read summary.json ({error.strerror})") from error
    except ValueError as error:
        raise OodlensError(f"{folder}: summary.json is damaged ({error})") from error
    validate_summary(summary, f"{folder}/summary.json")
    return summary


def collect(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One tidy DataFrame from many report folders: a row per (run, method, metric) with the value, its 95 %
    interval (``low``, ``high``; NaN where none) and ``n`` (windows, prompts) beside it.

    ``paths``: folders, or glob patterns (``"runs/*"``). Metrics: ``ppl_within_train_length``,
    ``ppl_beyond_train_length``, ``passkey@<length>``, ``<task>@<length>``, ``bleu@<milestone>``,
    ``rouge_l@<milestone>``, the factors of the diagnosis (``max_logit_beyond``, …: n is the number of
    windows, no interval) and ``stream_ppl@<tokens>`` of a streamed run (interval over its buckets).

    Raises:
        OodlensError: no folder matched, or one of them is not a finished, valid report (named).
    """
    folders = _expand(paths)
    if not folders:
        raise OodlensError(f"no report folder matches {paths!r}: check the paths or the glob pattern")
    rows = [row for folder in folders for row in _rows(folder, read_summary(folder))]
    return pd.DataFrame(rows, columns=COLUMNS)


def resume_state(folder: str | Path, config: ProbeConfig) -> Literal["run", "complete", "replace"]:
    """What ``--resume`` does with ``folder``: ``"complete"`` when it holds a finished, valid report of the
    same settings (skip the run), ``"replace"`` when it holds a report oodlens wrote that is damaged or of an
    older schema (run again over it), ``"run"`` when there is no report there.

    The settings compared are the resolved ones, those the run would use: a length left to its default is
    resolved against the pretraining length of the model, taken from the report's own record of that same
    model (named alike, as compared) so that no model is loaded to decide.

    Raises:
        OodlensError: the folder holds a valid report of other settings (naming them), so that a mistyped
            ``--out`` never replaces another run."""
    folder = Path(folder)
    if not folder.exists():
        return "run"
    if folder_kind(folder) != REPORT_KIND:
        return "run"  # not a report: the usual output checks refuse it or take the empty folder
    try:
        summary = read_summary(folder)
    except OodlensError:
        return "replace"
    stored = summary["config"]
    given = {name: value for name, value in json_ready(asdict(config)).items() if value is not None}
    differs = _differing(stored, given)  # first the options given: another model is named as such
    if not differs:
        # the same model: the report's train_length is its own where the report left it to the model (where
        # the report set one and this run does not, the train_length field differs below)
        train_length = config.train_length if config.train_length is not None else summary["train_length"]
        differs = _differing(stored, json_ready(asdict(config.resolved(train_length))))
    if differs:
        raise OodlensError(
            f"{folder} holds a finished report of other settings ({', '.join(differs)} differ): use another "
            "--out, or --overwrite to replace it"
        )
    return "complete"


def _differing(stored: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The settings in ``asked`` whose value is not the one ``stored`` (progress bars are no setting)."""
    return [name for name, value in asked.items() if name != "progress" and stored.get(name) != value]


def _expand(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        found += [Path(match) for match in matches]  # glob leaves out hidden (staging) folders itself
    return list(dict.fromkeys(found))


def _rows(folder: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    run = {
        "run": str(folder),
        "model": summary["model"],
        "length": summary["length"],
        "train_length": summary["train_length"],
    }
    rows = []
    for method, block in summary["methods"].items():
        if "skipped" in block:
            continue
        intervals = block["intervals"]
        for metric in ("ppl_within_train_length", "ppl_beyond_train_length"):
            rows.append(_row(run, method, metric, intervals.get(metric), block[metric]))
        for length, estimate in intervals.get("passkey", {}).items():
            rows.append(_row(run, method, f"passkey@{length}", estimate))
        for task, lengths in intervals.get("tasks", {}).items():
            for length, estimate in lengths.items():
                rows.append(_row(run, method, f"{task}@{length}", estimate))
        for milestone, scores in intervals.get("generation", {}).items():
            for score, estimate in scores.items():
                rows.append(_row(run, method, f"{score}@{milestone}", estimate))
        # summaries written before the factors carried their n get the same estimates from their numbers
        factors = intervals.get("diagnosis") or {
            key: estimate.to_dict()
            for key, estimate in factor_estimates(block.get("diagnosis", {}), summary["n_windows"]).items()
        }
        for metric, estimate in factors.items():
            rows.append(_row(run, method, metric, estimate))
    stream = summary.get("streaming")
    if stream:  # summaries written before the stream carried its interval give its value alone
        estimate = stream.get("intervals", {}).get("ppl")
        rows.append(_row(run, stream["method"], f"stream_ppl@{stream['n_tokens']}", estimate, stream["ppl"]))
    return rows


def _row(
    run: dict[str, Any], method: str, metric: str, estimate: dict | None, value: float | None = None
) -> dict[str, Any]:
    estimate = estimate or {"value": value, "n": None}
    return {
        **run,
        "method": method,
        "metric": metric,
        "value": _number(estimate.get("value")),
        "low": _number(estimate.get("low")),
        "high": _number(estimate.get("high")),
        "n": estimate.get("n"),
    }


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)
