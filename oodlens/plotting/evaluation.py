"""Figures of evaluation results: perplexity by position (Fig. 3), passkey (Table 2), generation quality
(Table 3) and method comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..display import format_number
from ..errors import OodlensError
from ..stats import bootstrap_interval, perplexity_interval, wilson_interval
from .base import (
    as_frame,
    draw_series,
    figure_legend,
    finish_axes,
    mark_train_length,
    new_axes,
    run_frames,
)
from .style import PANEL_SIZE, method_hatch, method_rank, method_style, styled

# ------------------------------------------------------------------------------------------ evaluation

PERPLEXITY_COLUMNS = ["start", "end", "nll", "n_tokens"]  # method optional (StreamingResult has none)
STREAMING_COLUMNS = ["start", "end", "nll", "n_tokens", "peak_memory_gib"]
PASSKEY_COLUMNS = ["method", "length", "depth", "correct"]
GENERATION_COLUMNS = ["method", "milestone", "bleu", "rouge_l"]
COMPARISON_COLUMNS = ["method", "metric", "value"]


@styled
def plot_perplexity_by_position(
    data: Any, train_length: int | None = None, *, ax: Axes | None = None
) -> Figure:
    """Perplexity per position bucket (Fig. 3), one line per method, log y, bucket centres on x.

    Reads the perplexity frame (``PerplexityResult`` or ``StreamingResult.to_dataframe``): start, end, nll
    (mean per token), n_tokens, and method where there is one (else the dict label names the line). Rows
    of the same method and bucket (e.g. several documents) are pooled token-weighted: exp(Σ nll·n / Σ n).
    Where the frame has ``ppl_low``/``ppl_high`` (an interval over windows) it is drawn as a band. Buckets
    whose nll is NaN or infinite (a model that overflowed) are left off.
    """
    runs = run_frames(data, "perplexity", PERPLEXITY_COLUMNS)
    runs["position"] = (runs["start"] + runs["end"]) / 2
    runs["weighted"] = runs["nll"].fillna(np.inf) * runs["n_tokens"]  # a NaN bucket stays off the plot
    sums = {"weighted": "sum", "n_tokens": "sum"} | {c: "mean" for c in ("ppl_low", "ppl_high") if c in runs}
    pooled = runs.groupby(["series", "position"], sort=False).agg(sums).reset_index()
    pooled["mean"] = np.exp(pooled["weighted"] / pooled["n_tokens"])
    pooled["low"] = pooled.get("ppl_low", pooled["mean"]).fillna(pooled["mean"])
    pooled["high"] = pooled.get("ppl_high", pooled["mean"]).fillna(pooled["mean"])
    n_series = pooled["series"].nunique()
    # many methods: a taller figure, so the legend below does not take the plot's place
    size = {"figsize": (PANEL_SIZE[0] * 1.4, PANEL_SIZE[1] * 1.6)} if n_series > 6 else {}
    fig, (panel_ax,) = new_axes(ax, **size)
    sparse = pooled.groupby("series").size().max() <= 40
    draw_series(panel_ax, pooled, "position", markers=sparse)
    mark_train_length(panel_ax, train_length)
    finish_axes(panel_ax, "position (tokens)", "perplexity", logy=True)
    figure_legend(fig, [panel_ax], own_figure=ax is None)
    return fig


@styled
def plot_streaming(data: Any, bucket: int = 65_536, train_length: int | None = None) -> Figure:
    """A long stream (``StreamingResult.to_dataframe``, one frame per method): perplexity and peak memory per
    ``bucket`` of stream positions, one line per method, each point at the middle of the positions it covers.

    The result's own (finer) buckets are pooled into ``bucket``-wide ones, token-weighted; the band is a 95 %
    bootstrap interval over the fine buckets inside each, and memory is the largest peak among them. Flat
    lines are the claim a bounded cache makes: quality and memory that do not depend on how far the stream
    has gone. With several methods a middle panel shows each one's perplexity relative to the first method's
    over the same tokens (in %), where the content's own variation cancels: its band is a paired bootstrap
    over the fine buckets.
    """
    if bucket < 1:
        raise OodlensError(f"plot_streaming needs a bucket of at least 1 token, got {bucket}")
    runs = run_frames(data, "streaming", STREAMING_COLUMNS)
    runs = runs[runs["n_tokens"] > 0].assign(display=runs["start"] // bucket)
    rows = []
    for (series, _), group in runs.groupby(["series", "display"], sort=False):
        ppl, low, high, _ = perplexity_interval(group["nll"], group["n_tokens"])
        position = (group["start"].min() + group["end"].max()) / 2  # the last bucket may end early
        memory = group["peak_memory_gib"].max()
        rows.append(dict(series=series, position=position, ppl=ppl, low=low, high=high, memory=memory))
    pooled = pd.DataFrame(rows)
    names = list(dict.fromkeys(runs["series"]))
    fig, axes = new_axes(None, 3 if len(names) > 1 else 2)
    ppl_ax, memory_ax = axes[0], axes[-1]
    if len(names) > 1:
        _draw_relative(axes[1], runs, names)
    quality = pooled.assign(mean=pooled["ppl"], low=pooled["low"].fillna(pooled["ppl"]))
    draw_series(ppl_ax, quality.assign(high=quality["high"].fillna(quality["ppl"])), "position", markers=True)
    memory = pooled.assign(mean=pooled["memory"], low=pooled["memory"], high=pooled["memory"])
    draw_series(memory_ax, memory, "position", markers=True)
    for panel_ax in axes:
        mark_train_length(panel_ax, train_length)
    finish_axes(ppl_ax, "stream position (tokens)", f"perplexity per {bucket:,} tokens")
    finish_axes(memory_ax, "stream position (tokens)", "peak memory (GiB)", ybottom=0)
    if np.isfinite(pooled["memory"].max()):  # room above a flat line, which would sit on the frame
        memory_ax.set_ylim(top=1.25 * pooled["memory"].max())
    figure_legend(fig, [ppl_ax, memory_ax], own_figure=True)
    return fig


def _draw_relative(ax: Axes, runs: pd.DataFrame, names: list[str]) -> None:
    """Each later method's perplexity over the first method's on the same fine buckets, per display bucket,
    in %, with a paired bootstrap band (the NLL differences of the fine buckets resampled together)."""
    reference = runs.loc[runs["series"] == names[0], ["start", "nll"]]
    rows = []
    for name in names[1:]:
        paired = runs[runs["series"] == name].merge(reference, on="start", suffixes=("", "_reference"))
        paired = paired.assign(difference=paired["nll"] - paired["nll_reference"])
        for _, group in paired.groupby("display", sort=True):
            ratio, low, high, _ = perplexity_interval(group["difference"], group["n_tokens"])
            position = (group["start"].min() + group["end"].max()) / 2
            rows.append(dict(series=name, position=position, mean=100 * (ratio - 1),
                             low=100 * (low - 1), high=100 * (high - 1)))  # fmt: skip
    relative = pd.DataFrame(rows)
    relative = relative.assign(low=relative["low"].fillna(relative["mean"]))
    draw_series(ax, relative.assign(high=relative["high"].fillna(relative["mean"])), "position", markers=True)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    finish_axes(ax, "stream position (tokens)", f"perplexity vs {names[0]} (%)")


def _spread(names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Small horizontal offsets per series (a fraction of the closest x spacing) so error bars do not
    overlap."""
    gaps = np.diff(np.unique(x))
    step = 0.12 * (gaps.min() if gaps.size else max(abs(float(x.max())), 1.0)) / max(len(names) - 1, 1)
    centre = (len(names) - 1) / 2
    return {name: (index - centre) * step for index, name in enumerate(names)}


def _interval_lines(ax: Axes, table: pd.DataFrame, x: str, names: list[str]) -> None:
    """Per series: its points joined by a line, with error bars from ``low`` to ``high``."""
    offsets = _spread(names, table[x].to_numpy(dtype=float))
    for name in names:
        rows = table[table["series"] == name].sort_values(x)
        look = method_style(name)
        ax.errorbar(
            rows[x] + offsets[name],
            rows["mean"],
            yerr=np.clip([rows["mean"] - rows["low"], rows["high"] - rows["mean"]], 0, None),  # rounding
            color=look["color"],
            linestyle=look["linestyle"],
            marker=look["marker"] or "o",
            markersize=4,
            capsize=2.5,
            elinewidth=0.9,
            label=name,
        )


@styled
def plot_passkey(data: Any, train_length: int | None = None, *, ax: Axes | None = None) -> Figure:
    """Passkey accuracy against prompt length (Table 2), one line per method, with 95 % Wilson intervals.

    Reads the passkey frame (``PasskeyResult.to_dataframe``): method, length, depth, correct; a cell's
    accuracy pools its depths and samples (n prompts), its interval is the Wilson score interval of that
    count, so 1 of 1 reads as the weak evidence it is.
    """
    runs = run_frames(data, "passkey", PASSKEY_COLUMNS)
    counts = runs.groupby(["series", "length"], sort=False)["correct"].agg(["sum", "size"]).reset_index()
    counts["mean"] = counts["sum"] / counts["size"]
    counts["low"], counts["high"] = wilson_interval(counts["sum"].to_numpy(), counts["size"].to_numpy())
    names = sorted(counts["series"].unique(), key=lambda name: method_rank(str(name)))
    fig, (panel_ax,) = new_axes(ax)
    _interval_lines(panel_ax, counts, "length", names)
    mark_train_length(panel_ax, train_length)
    finish_axes(panel_ax, "prompt length (tokens)", "passkey accuracy", ybottom=-0.03)
    panel_ax.set_ylim(top=1.03)
    panel_ax.set_xticks(sorted(counts["length"].unique()))  # the lengths asked for, in tokens
    figure_legend(fig, [panel_ax], own_figure=ax is None)
    return fig


@styled
def plot_method_comparison(
    data: Any,
    *,
    metrics: Sequence[str] | None = None,
    facet: bool = False,
    ylabel: str | None = None,
    fractions: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Grouped bars: one group per metric, one bar per method, value labels on the bars.

    Reads any tidy frame with columns method, metric, value, and optionally low/high (an interval, drawn as
    an error bar) and n (samples behind a value); repeated rows are averaged, unless they carry intervals (an
    average of interval ends is no interval: an error). ``metrics`` picks and orders them. Metrics on
    different scales read better with ``facet=True``: one panel per metric, titled by it (with its n where
    every bar has the same), each on its own y axis, labelled ``ylabel`` (default: the metric's name without
    its parenthesis). ``fractions=True``: the values are fractions (task scores, accuracies), drawn on one
    0–1 scale in every panel.
    """
    runs = run_frames(data, "method-comparison", COMPARISON_COLUMNS)
    metrics = list(metrics) if metrics is not None else list(runs["metric"].unique())
    missing = sorted(set(metrics) - set(runs["metric"]))
    if missing:
        raise OodlensError(f"metric {missing[0]!r} is not in the data (has {sorted(set(runs['metric']))})")
    runs = runs[runs["metric"].isin(metrics)]
    repeated = runs[runs.duplicated(["metric", "series"], keep=False)]
    has_intervals = bool(runs.reindex(columns=["low", "high"]).notna().to_numpy().any())
    if has_intervals and not repeated.empty:
        raise OodlensError(
            f"method-comparison data has several rows with intervals for {repeated['series'].iloc[0]!r} "
            f"at {repeated['metric'].iloc[0]!r}: intervals cannot be averaged; give one row per method and "
            "metric"
        )
    names = sorted(runs["series"].unique(), key=lambda name: method_rank(str(name)))
    if not facet:
        fig, (panel_ax,) = new_axes(ax)
        crowded = _bars(panel_ax, runs, names, groups=metrics)
        _fraction_scale(panel_ax, fractions, crowded)
        panel_ax.set_ylabel(ylabel or "value")
        figure_legend(fig, [panel_ax], own_figure=ax is None)
        return fig
    fig, axes = new_axes(ax, len(metrics), ncols=min(len(metrics), 3))
    for panel_ax, metric in zip(axes, metrics, strict=True):
        panel = runs[runs["metric"] == metric]
        crowded = _bars(panel_ax, panel, names, groups=None)
        _fraction_scale(panel_ax, fractions, crowded)
        counts = panel["n"].dropna().unique() if "n" in panel else []
        title = metric + (f" (n = {int(counts[0])})" if len(counts) == 1 else "")
        panel_ax.set_title(title, fontsize="medium")
        panel_ax.set_ylabel(ylabel or metric.split(" (")[0])
    return fig


def _fraction_scale(ax: Axes, fractions: bool, crowded: bool) -> None:
    """Fractions on 0-1 ticks, with room above 1 for the value labels (upright ones take more)."""
    if fractions:
        ax.set_ylim(0, 1.4 if crowded else 1.2)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1])


def _bars(ax: Axes, frame: pd.DataFrame, names: list[str], *, groups: list[str] | None) -> bool:
    """Bars of ``frame``'s mean value: per method (``groups=None``), or per method within each metric
    group; True when they crowd (their value labels then stand upright)."""
    table = frame.groupby(["metric", "series"], sort=False).agg(
        value=("value", "mean"), **{c: (c, "mean") for c in ("low", "high") if c in frame}
    )
    group_names = groups or [None]
    width = 0.8 / (len(names) if groups else 1)
    crowded = len(names) * len(group_names) > 8  # level labels of narrow bars run into each other
    for index, name in enumerate(names):
        xs, heights, lows, highs = [], [], [], []
        for position, group in enumerate(group_names):
            key = (group if group is not None else frame["metric"].iloc[0], name)
            if key not in table.index:
                continue
            row = table.loc[key]
            xs.append(position + (index - (len(names) - 1) / 2) * width if groups else index)
            heights.append(row["value"])
            lows.append(row.get("low", row["value"]))
            highs.append(row.get("high", row["value"]))
        look = method_style(name)
        heights = np.asarray(heights, dtype=float)
        errors = np.clip(
            [heights - np.asarray(lows, dtype=float), np.asarray(highs, dtype=float) - heights], 0, None
        )
        interval = {"yerr": errors, "capsize": 2} if {"low", "high"} <= set(frame.columns) else {}
        ax.bar(
            xs, heights, width=width, color=look["color"], hatch=method_hatch(name), edgecolor="white",
            linewidth=0, label=name, **interval,
        )  # fmt: skip
        # each value above its bar's interval, where no error bar crosses it
        for x, height, top in zip(xs, heights, np.fmax(heights, np.asarray(highs, dtype=float)), strict=True):
            ax.annotate(
                format_number(float(height)), (x, top), xytext=(0, 2), textcoords="offset points",
                ha="center", va="bottom", fontsize="x-small", rotation=90 if crowded else 0,
            )  # fmt: skip
    if groups:
        ax.set_xticks(range(len(groups)), groups)
    else:
        upright = len(names) > 5  # slanted names of many methods run into each other
        rotation, align = (90, "center") if upright else (30, "right")
        ax.set_xticks(range(len(names)), names, rotation=rotation, ha=align)
    ax.margins(y=0.35 if crowded else 0.15)  # room for the labels above the intervals
    return crowded


@styled
def plot_generation_quality(data: Any, train_length: int | None = None) -> Figure:
    """BLEU and ROUGE-L of the continuation generated after each milestone length (Table 3), per method.

    Reads the generation frame (``GenerationResult.to_dataframe``): method, milestone, bleu, rouge_l.
    Repeated rows (windows) are averaged, with a 95 % bootstrap interval over them (none for one window).
    """
    runs = run_frames(data, "generation", GENERATION_COLUMNS)
    names = sorted(runs["series"].unique(), key=lambda name: method_rank(str(name)))
    fig, axes = new_axes(None, 2, sharex=True)
    for panel_ax, (value, label) in zip(axes, (("bleu", "BLEU"), ("rouge_l", "ROUGE-L")), strict=True):
        cells = runs.groupby(["series", "milestone"], sort=False)[value]
        table = cells.mean().rename("mean").reset_index()
        intervals = [bootstrap_interval(values.to_numpy()) for _, values in cells]
        table["low"] = [
            low if np.isfinite(low) else mean for (low, _), mean in zip(intervals, table["mean"], strict=True)
        ]
        table["high"] = [
            high if np.isfinite(high) else mean
            for (_, high), mean in zip(intervals, table["mean"], strict=True)
        ]
        _interval_lines(panel_ax, table, "milestone", names)
        mark_train_length(panel_ax, train_length)
        finish_axes(panel_ax, "context (tokens)", label, ybottom=0)
        panel_ax.set_xticks(sorted(table["milestone"].unique()))  # the milestones generated after
    figure_legend(fig, axes)
    return fig


EFFICIENCY_COLUMNS = ["method", "length", "marginal_ms_per_token", "ms_per_token", "peak_gib"]


@styled
def plot_efficiency(data: Any, train_length: int | None = None) -> Figure:
    """Speed and memory of one forward against length (one line per method): the marginal time per token (the
    cost of the tokens added since the previous length — flat for an O(n) method, growing for full
    attention), drawn at the middle of each added span, and the peak memory on an axis from zero.

    Reads the efficiency frame of ``analyses/efficiency.py``: method, length, marginal_ms_per_token,
    ms_per_token, peak_gib (one row per method and length).
    """
    frame = as_frame(data, "efficiency", EFFICIENCY_COLUMNS, "to_dataframe").sort_values(["method", "length"])
    fig, (time_ax, memory_ax) = new_axes(None, 2, sharex=True)
    for method in sorted(frame["method"].unique(), key=method_rank):
        rows = frame[frame["method"] == method]
        look = method_style(method)
        previous = rows["length"].shift()
        spans = rows.assign(middle=(previous + rows["length"]) / 2).dropna(subset=["marginal_ms_per_token"])
        time_ax.plot(spans["middle"], spans["marginal_ms_per_token"], label=method, **look)
        memory_ax.plot(rows["length"], rows["peak_gib"], label=method, **look)
    lengths = sorted(frame["length"].unique())
    for ax, label in ((time_ax, "ms per added token"), (memory_ax, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        mark_train_length(ax, train_length)
        finish_axes(ax, "sequence length (tokens)", label, ybottom=0)
        ax.set_xticks(lengths)
    figure_legend(fig, [time_ax, memory_ax])
    return fig


REPAIR_COLUMNS = ["method", "quantity", "ratio"]
REPAIR_SCALE = 8.0  # a ratio this far from 1 (either way) takes the darkest colour


@styled
def plot_repair_map(data: Any) -> Figure:
    """What each method repairs: methods × quantities, each cell the method's value beyond the pretraining
    length relative to vanilla's in-distribution value (1 = as in training).

    Reads a tidy frame: method, quantity, ratio, and optionally ``label`` (the text written in the cell,
    default the ratio as ``1.03×``). Colour is the distance from 1 on a log scale, the same for a ratio and
    its inverse (0.5× and 2× alike), darkest at :data:`REPAIR_SCALE`× or beyond; a missing ratio (NaN) is a
    hatched cell. Rows keep the methods' standard order, columns the order of first appearance.
    """
    import matplotlib as mpl

    frame = as_frame(data, "repair map", REPAIR_COLUMNS, "to_dataframe")
    methods = sorted(frame["method"].unique(), key=method_rank)
    quantities = list(dict.fromkeys(frame["quantity"]))
    table = frame.pivot_table(
        index="method", columns="quantity", values="ratio", aggfunc="first", dropna=False
    )
    table = table.reindex(index=methods, columns=quantities).astype(float)
    labels = frame.set_index(["method", "quantity"])["label"] if "label" in frame else None
    with np.errstate(divide="ignore", invalid="ignore"):
        # a ratio of 0 (nothing retrieved) or ∞ (an overflow) is as far as it gets: the darkest colour
        distance = np.minimum(np.abs(np.log(table.to_numpy())), np.log(REPAIR_SCALE))
    fig, (ax,) = new_axes(None, figsize=(1.1 * len(quantities) + 1.8, 0.38 * len(methods) + 1.1))
    cmap = mpl.colormaps["Reds"]
    shown = np.ma.masked_invalid(np.where(np.isnan(table.to_numpy()), np.nan, distance))
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=np.log(REPAIR_SCALE), aspect="auto")
    for row, method in enumerate(methods):
        for col, quantity in enumerate(quantities):
            ratio = table.iloc[row, col]
            if np.isnan(ratio):
                hatch = mpl.patches.Rectangle(
                    (col - 0.5, row - 0.5), 1, 1, fill=False, hatch="//", ec="0.8", lw=0
                )
                ax.add_patch(hatch)
            text = f"{format_number(ratio)}×" if not np.isnan(ratio) else "n/a"
            if labels is not None and isinstance(labels.get((method, quantity)), str):
                text = labels[method, quantity]
            dark = not np.isnan(ratio) and min(distance[row, col], np.log(REPAIR_SCALE)) > 0.6 * np.log(
                REPAIR_SCALE
            )
            ax.text(col, row, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(quantities)), [quantity.replace(": ", "\n") for quantity in quantities])
    ax.set_yticks(range(len(methods)), methods)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    colorbar = fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0, np.log(REPAIR_SCALE)), cmap), ax=ax)
    ticks = [1, 2, 4, REPAIR_SCALE]
    colorbar.set_ticks(np.log(ticks), labels=[f"{t:g}× (or 1/{t:g})" if t > 1 else "1×" for t in ticks])
    colorbar.set_label("distance from in-distribution")
    return fig
