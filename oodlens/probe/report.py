"""The probe's output folder: ``summary.json``, tables, saved diagnoses, figures and ``report.md``.

Everything is written into a hidden staging folder beside the target and moved into place at the end, so an
interrupted run leaves no half-written summary and an existing report is replaced only by a complete one.
The schema is documented in ``docs/report-schema.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from .. import plotting
from ..display import estimate_text, format_number
from ..storage import FolderWriter, folder_kind, preflight, write_folder, write_json
from ..theory import factor_findings
from .result import ProbeResult, passkey_text

REPORT_KIND = "report"


def prepare_output(folder: Path, overwrite: bool) -> FolderWriter:
    """Before a long run: check that ``folder`` may be written (a new or empty folder, or an earlier report
    with ``overwrite``, asked for on a terminal), lock it against a second run, and create its staging folder
    (:func:`oodlens.storage.preflight`); use the writer as a context manager and hand it to
    :func:`write_report`."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    wants_overwrite = overwrite or (
        folder_kind(folder) == REPORT_KIND
        and sys.stdin.isatty()
        and input(f"{folder} already holds a report; replace it when the run finishes? [y/N] ")
        .strip()
        .lower()
        in ("y", "yes")
    )
    return preflight(folder, kind=REPORT_KIND, overwrite=wants_overwrite)


def write_report(result: ProbeResult, folder: Path | FolderWriter, overwrite: bool = False) -> Path:
    """Write the whole output folder for ``result`` atomically: through the writer :func:`prepare_output`
    made, or (given a path) through :func:`oodlens.storage.write_folder`."""

    def fill(root: Path) -> None:
        _write_contents(result, root)

    if isinstance(folder, FolderWriter):
        return folder.commit(fill)
    return write_folder(folder, fill, kind=REPORT_KIND, overwrite=overwrite)


def _write_contents(result: ProbeResult, root: Path) -> None:
    tables = root / "tables"
    tables.mkdir()
    frames = _tables(result)
    for name, frame in frames.items():
        frame.to_csv(tables / f"{name}.csv", index=False)
    for method, diagnosis in result.diagnoses.items():
        diagnosis.save(root / "diagnosis" / method)
    figures = _figures(result, root / "figures")
    summary = result.summary()
    summary["files"] = {
        "figures": [str(path.relative_to(root)) for path in figures],
        "tables": [f"tables/{name}.csv" for name in frames],
        "diagnoses": [f"diagnosis/{method}" for method in result.diagnoses],
    }
    write_json(root / "summary.json", summary)
    (root / "report.md").write_text(render_markdown(result, summary, figures, root))


def _tables(result: ProbeResult) -> dict[str, pd.DataFrame]:
    frames = {"perplexity": result.perplexity.to_dataframe()}
    if result.passkey is not None:
        frames["passkey"] = result.passkey.to_dataframe()
    if result.generation is not None:
        frames["generation"] = result.generation.to_dataframe()
    if result.streaming is not None:
        frames["streaming"] = result.streaming.to_dataframe()
    if result.tasks is not None:
        frames["tasks"] = result.tasks.to_dataframe()
        frames["task_accuracy"] = result.tasks.accuracy()
    for method, theory in result.theory.items():
        for kind in ("entropy_bound", "entropy_fit", "logit_growth"):
            frames[f"theory-{kind}-{method}"] = theory.to_dataframe(kind)
    frames["comparison"] = comparison_frame(result)
    return frames


def comparison_frame(result: ProbeResult) -> pd.DataFrame:
    """Tidy ``[method, metric, value, low, high, n]`` of the headline numbers, for the comparison figure and
    table: perplexities with their bootstrap interval over windows, passkey accuracies with their Wilson
    interval over prompts; the diagnosis' factors come from one capture pooled over the windows (n windows, no
    interval)."""
    rows = []
    for method, block in result.summary()["methods"].items():
        if "skipped" in block:
            continue
        intervals = block["intervals"]
        for key, label in (
            ("ppl_beyond_train_length", "ppl beyond train length"),
            ("ppl_within_train_length", "ppl within train length"),
        ):
            rows.append(_estimate_row(method, label, intervals[key]))
        factors = intervals.get("diagnosis", {})
        for key, label in (("max_logit_beyond", "max logit beyond"), ("entropy_beyond", "entropy beyond")):
            if key in factors:
                rows.append(_estimate_row(method, label, factors[key]))
        for length, estimate in intervals.get("passkey", {}).items():
            rows.append(_estimate_row(method, f"passkey accuracy @ {length}", estimate))
    frame = pd.DataFrame(rows, columns=["method", "metric", "value", "low", "high", "n"])
    return frame.dropna(subset=["value"])


def _estimate_row(method: str, metric: str, estimate: dict) -> tuple:
    return (method, metric, estimate["value"], estimate["low"], estimate["high"], estimate["n"])


def _figures(result: ProbeResult, folder: Path) -> list[Path]:
    """Draw every figure that the result has data for; returns the PNG paths."""
    folder.mkdir(parents=True)
    train = result.train_length
    diagnoses = result.diagnoses
    drawings = {}
    if diagnoses:
        drawings |= {
            "logits_by_distance": lambda: plotting.plot_logits_by_distance(diagnoses, train),
            "max_logit_by_position": lambda: plotting.plot_max_logit_by_position(diagnoses, train),
            "entropy_by_position": lambda: plotting.plot_entropy_by_position(diagnoses, train),
            "sink_mass": lambda: plotting.plot_sink_mass(diagnoses, train),
            "hidden_pca": lambda: plotting.plot_hidden_pca(diagnoses),
            "hidden_norm": lambda: plotting.plot_hidden_norm(diagnoses, train),
        }
    drawings["perplexity_by_position"] = lambda: plotting.plot_perplexity_by_position(
        result.perplexity, train
    )
    if result.passkey is not None:
        drawings["passkey"] = lambda: plotting.plot_passkey(result.passkey, train)
    if result.generation is not None:
        drawings["generation_quality"] = lambda: plotting.plot_generation_quality(result.generation, train)
    if result.tasks is not None:
        drawings["tasks"] = lambda: plotting.plot_method_comparison(
            result.tasks.metric_frame(), facet=True, ylabel="mean score", fractions=True
        )
    comparison = comparison_frame(result)
    if not comparison.empty:
        drawings["method_comparison"] = lambda: plotting.plot_method_comparison(comparison, facet=True)
    if result.streaming is not None:
        drawings["streaming_perplexity"] = lambda: plotting.plot_perplexity_by_position(
            {result.streaming.method: result.streaming}, train
        )
    paths = []
    with plotting.style():
        for name, draw in drawings.items():
            figure = draw()
            _, png = plotting.save_figure(figure, folder / name)
            plt.close(figure)
            paths.append(png)
    return paths


def figure_captions(result: ProbeResult) -> dict[str, str]:
    """A caption for every figure, saying what is drawn and what this run's numbers show."""
    train, length = result.train_length, result.config.length
    findings = {
        method: {f.factor: f for f in factor_findings(d.summary(), length, train)}
        for method, d in result.diagnoses.items()
    }

    def per_method(factor: int, describe) -> str:
        return "; ".join(f"{method}: {describe(found[factor])}" for method, found in findings.items())

    captions = {
        "logits_by_distance": "Factor 1 — the largest attention logit up to each query–key distance "
        "(median over heads, band: interquartile range). Largest logit beyond L vs within: "
        + per_method(1, lambda f: f"{format_number(f.beyond)} vs {format_number(f.within)}")
        + ".",
        "max_logit_by_position": "Largest attention logit of each sampled query against its position.",
        "entropy_by_position": "Factor 2 — attention entropy against query position, with the ln n entropy "
        "of attending evenly. Mean entropy beyond L vs the second half of L: "
        + per_method(2, lambda f: f"{format_number(f.beyond)} vs {format_number(f.within)} nats")
        + ".",
        "sink_mass": "Attention mass on the starting tokens against query position. Within L: "
        + per_method(3, lambda f: format_number(f.within))
        + ".",
        "hidden_pca": "Factor 3 — PCA of hidden states coloured by position, starting tokens drawn large. "
        "Best ROC-AUC of a linear probe telling them from the rest: "
        + per_method(3, lambda f: format_number(f.beyond))
        + ".",
        "hidden_norm": "Hidden-state norm and cosine similarity to the mean of later positions, by position.",
        "perplexity_by_position": "Perplexity by position (log scale) for every method and the "
        "content-matched baseline whose context is truncated to the pretraining length. "
        + _perplexity_sentence(result),
        "method_comparison": "Headline numbers per method, with their 95 % intervals where they have one "
        "(perplexity over windows, passkey over prompts; the factors come from one capture).",
    }
    if result.passkey is not None:
        captions["passkey"] = (
            "Passkey retrieval by prompt length and needle depth, correct of n prompts with the 95 % Wilson "
            f"interval: {passkey_text(result)}."
        )
    if result.generation is not None:
        captions["generation_quality"] = (
            "BLEU and ROUGE-L of the greedy continuation against the real one, mean over windows with "
            "the 95 % bootstrap interval (none from one window): "
            + "; ".join(
                f"{method} ROUGE-L "
                + ", ".join(f"{estimate_text(v['rouge_l'])} after {k}" for k, v in by_milestone.items())
                for method, by_milestone in result.generation.intervals().items()
            )
            + "."
        )
    if result.tasks is not None:
        captions["tasks"] = (
            "RULER-style tasks, mean score of each method with its 95 % Wilson interval over prompts "
            "(conservative for partial scores): "
            + "; ".join(
                f"{row.method} {row.task} @ {row.length} {format_number(row.value)} "
                f"[{format_number(row.low)}, {format_number(row.high)}] of {row.n}"
                for row in result.tasks.accuracy().itertuples()
            )
            + "."
        )
    if result.streaming is not None:
        stream = result.streaming
        captions["streaming_perplexity"] = (
            f"Streaming perplexity of {stream.method} through its bounded cache over "
            f"{stream.n_tokens:,} tokens: {estimate_text(stream.estimate().to_dict())} overall (interval "
            f"over its {stream.bucket:,}-token buckets), "
            f"at most {stream.peak_cache_tokens:,} keys held per layer."
        )
    return captions


def _perplexity_sentence(result: ProbeResult) -> str:
    summary = result.perplexity.summary()["methods"]
    return (
        "Beyond L: "
        + ", ".join(
            f"{method} {format_number(block['ppl_beyond_train_length'])}" for method, block in summary.items()
        )
        + "."
    )


def render_markdown(result: ProbeResult, summary: dict, figures: list[Path], root: Path) -> str:
    """``report.md``: the run, the verdict, a table of numbers and every figure with a caption."""
    cfg = result.config
    captions = figure_captions(result)
    lines = [
        f"# oodlens probe: {result.info.name}",
        "",
        f"Pretraining length **{result.train_length}** tokens ({result.info.train_length_source}); "
        f"{cfg.windows} window(s) of **{cfg.length}** tokens from `{cfg.corpus}`; methods: "
        f"{', '.join(cfg.methods)}; {result.info.dtype} on {result.info.device}; {result.seconds:.0f} s.",
        "",
        "## Verdict",
        "",
        result.verdict(),
        "",
        "## Numbers",
        "",
        "Perplexity and BLEU / ROUGE-L with their 95 % bootstrap interval over windows (none from one "
        f"window), passkey with its 95 % Wilson interval over prompts; logits and entropies from one "
        f"capture pooled over the {summary['n_windows']} window(s) (maxima and means over all their queries, "
        "no interval).",
        "",
        "| method | ppl ≤ train | ppl > train | max logit ≤ train | max logit > train | entropy ≤ train "
        "| entropy > train | passkey (correct/n) | BLEU / ROUGE-L |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, block in summary["methods"].items():
        if "skipped" in block:
            lines.append(f"| {method} | skipped: {block['skipped']} |||||||| ")
            continue
        diagnosis, intervals = block.get("diagnosis", {}), block.get("intervals", {})
        passkey = (
            ", ".join(
                f"{k}: {estimate_text(v, count=True)}" for k, v in intervals.get("passkey", {}).items()
            )
            or "–"
        )
        generation = (
            "; ".join(
                f"{k}: {estimate_text(v.get('bleu'))} / {estimate_text(v.get('rouge_l'))}"
                for k, v in intervals.get("generation", {}).items()
            )
            or "–"
        )
        lines.append(
            f"| {method} | {estimate_text(intervals.get('ppl_within_train_length'))} "
            f"| {estimate_text(intervals.get('ppl_beyond_train_length'))} "
            f"| {format_number(diagnosis.get('max_logit_within'))} "
            f"| {format_number(diagnosis.get('max_logit_beyond'))} "
            f"| {format_number(diagnosis.get('entropy_within'))} "
            f"| {format_number(diagnosis.get('entropy_beyond'))} "
            f"| {passkey} | {generation} |"
        )
    if summary.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    lines += ["", "## Figures", ""]
    for png in figures:
        name = png.stem
        lines += [
            f"### {name.replace('_', ' ')}",
            "",
            captions.get(name, ""),
            "",
            f"![{name}]({png.relative_to(root)})",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `summary.json` — the numbers above (schema: docs/report-schema.md in the oodlens repository)",
        "- `tables/*.csv` — every table behind the figures",
        "- `diagnosis/<method>/` — the captured statistics (`oodlens.capture.Diagnosis.load`)",
        "- `figures/*.png|pdf` — the figures (PDF is vector)",
        "",
    ]
    return "\n".join(lines)


def print_summary(result: ProbeResult, folder: Path) -> None:
    """The run's perplexity table and verdict on standard output, and where the report is."""
    table = result.perplexity.summary()["methods"]
    print(
        f"\n{result.info.name}: pretraining length {result.train_length}, {result.config.windows} × "
        f"{result.config.length} tokens of {result.config.corpus}, {result.seconds:.0f} s"
    )
    print(f"{'method':20s} {'ppl ≤ train':>12s} {'ppl > train':>12s}")
    for method, block in table.items():
        print(
            f"{method:20s} {format_number(block['ppl_within_train_length']):>12s} "
            f"{format_number(block['ppl_beyond_train_length']):>12s}"
        )
    print("\n" + result.verdict())
    print(f"\nreport: {folder / 'report.md'}")


__all__ = ["comparison_frame", "prepare_output", "print_summary", "render_markdown", "write_report"]
