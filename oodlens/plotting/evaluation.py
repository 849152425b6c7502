"""Figures of evaluation results: perplexity by position (Fig. 3), passkey (Table 2), generation quality
(Table 3) and method comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import OodlensError
from .base import (
    as_frame,
    draw_series,
    figure_legend,
    finish_axes,
    format_tokens,
    mark_train_length,
    new_axes,
    run_frames,
    summarise,
)
from .style import method_color, styled

# ------------------------------------------------------------------------------------------ evaluation

PERPLEXITY_COLUMNS = ["start", "end", "nll", "n_tokens"]  # method optional (StreamingResult has none)
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
    Buckets whose nll is NaN or infinite (a model that overflowed) are left off.
    """
    runs = run_frames(data, "perplexity", PERPLEXITY_COLUMNS)
    runs["position"] = (runs["start"] + runs["end"]) / 2
    runs["weighted"] = runs["nll"].fillna(np.inf) * runs["n_tokens"]  # a NaN bucket stays off the plot
    pooled = runs.groupby(["series", "position"], sort=False)[["weighted", "n_tokens"]].sum().reset_index()
    pooled["mean"] = np.exp(pooled["weighted"] / pooled["n_tokens"])
    pooled["low"] = pooled["high"] = pooled["mean"]
    fig, (panel_ax,) = new_axes(ax)
    draw_series(panel_ax, pooled, "position", marker="o", markersize=3.5)
    mark_train_length(panel_ax, train_length)
    finish_axes(panel_ax, "position (tokens)", "perplexity", logy=True)
    figure_legend(fig, [panel_ax])
    return fig


def _passkey_panel(ax: Axes, accuracy: pd.DataFrame, train_length: int | None) -> None:
    grid = accuracy.pivot(index="depth", columns="length", values="correct").sort_index().sort_index(axis=1)
    sns.heatmap(
        grid,
        ax=ax,
        vmin=0,
        vmax=1,
        cmap="viridis",
        annot=True,
        fmt=".2f",
        cbar=False,
        annot_kws={"fontsize": "small"},
        linewidths=0.5,
        linecolor="white",
        xticklabels=[format_tokens(n) for n in grid.columns],
        yticklabels=[f"{d:g}" for d in grid.index],
    )
    if train_length is not None and 0 < (boundary := int((grid.columns <= train_length).sum())) < len(
        grid.columns
    ):
        mark_train_length(ax, train_length, x=boundary)
    ax.set(xlabel="length (tokens)", ylabel="needle depth")
    ax.tick_params(axis="y", rotation=0)


@styled
def plot_passkey_heatmap(data: Any, train_length: int | None = None) -> Figure:
    """Passkey accuracy as a length × depth heat map (Table 2), one panel per method, cells annotated.

    Reads the passkey frame (``PasskeyResult.to_dataframe``): method, length, depth, correct; accuracy is
    the mean of ``correct`` over samples. Colour scale fixed to 0–1, one colour bar for all panels.
    """
    runs = run_frames(data, "passkey", PASSKEY_COLUMNS)
    runs["correct"] = runs["correct"].astype(float)
    accuracy = runs.groupby(["series", "length", "depth"], sort=False)["correct"].mean().reset_index()
    names = list(accuracy["series"].unique())
    fig, axes = new_axes(None, len(names), sharey=True)
    for panel_ax, name in zip(axes, names, strict=True):
        _passkey_panel(panel_ax, accuracy[accuracy["series"] == name], train_length)
        panel_ax.set_title(name)
        if panel_ax is not axes[0]:
            panel_ax.set_ylabel("")
    figure_legend(fig, axes, outside="outside lower center")
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap="viridis"), ax=axes, label="accuracy", shrink=0.9)
    return fig


@styled
def plot_method_comparison(
    data: Any, *, metrics: Sequence[str] | None = None, facet: bool = False, ax: Axes | None = None
) -> Figure:
    """Grouped bars: one group per metric, one bar per method, value labels on the bars.

    Reads any tidy frame with columns method, metric, value; repeated rows are averaged with a ±1 std
    error bar. ``metrics`` picks and orders them. Metrics on different scales read better with
    ``facet=True``: one panel per metric, each on its own y axis.
    """
    runs = run_frames(data, "method-comparison", COMPARISON_COLUMNS)
    metrics = list(metrics) if metrics is not None else list(runs["metric"].unique())
    missing = sorted(set(metrics) - set(runs["metric"]))
    if missing:
        raise OodlensError(f"metric {missing[0]!r} is not in the data (has {sorted(set(runs['metric']))})")
    runs = runs[runs["metric"].isin(metrics)]
    palette = {name: method_color(name) for name in runs["series"].unique()}
    if not facet:
        fig, (panel_ax,) = new_axes(ax)
        _bars(panel_ax, runs, palette, x="metric", order=metrics)
        return fig
    fig, axes = new_axes(ax, len(metrics))
    for panel_ax, metric in zip(axes, metrics, strict=True):
        _bars(panel_ax, runs[runs["metric"] == metric], palette, x="series", order=list(palette))
        panel_ax.set(title=metric, xlabel="", ylabel="")
        panel_ax.tick_params(axis="x", rotation=30)
    return fig


def _bars(ax: Axes, frame: pd.DataFrame, palette: dict[str, str], *, x: str, order: list[str]) -> None:
    sns.barplot(
        frame,
        x=x,
        y="value",
        hue="series",
        hue_order=list(palette),
        order=order,
        palette=palette,
        errorbar="sd",
        saturation=1,
        ax=ax,
        legend=x != "series",
        err_kws={"linewidth": 1},
    )
    for container in ax.containers:
        ax.bar_label(container, fmt="%.3g", fontsize="x-small", padding=1)
    ax.set(xlabel="", ylabel="value")
    if ax.get_legend() is not None:
        ax.legend(title=None)


@styled
def plot_generation_quality(data: Any, train_length: int | None = None) -> Figure:
    """BLEU and ROUGE-L of the continuation generated after each milestone length (Table 3), per method.

    Reads the generation frame (``GenerationResult.to_dataframe``): method, milestone, bleu, rouge_l.
    Repeated rows (samples) are averaged, with a ±1 std band.
    """
    runs = run_frames(data, "generation", GENERATION_COLUMNS)
    fig, axes = new_axes(None, 2, sharex=True)
    for panel_ax, (value, label) in zip(axes, (("bleu", "BLEU"), ("rouge_l", "ROUGE-L")), strict=True):
        draw_series(
            panel_ax, summarise(runs, "milestone", value, "std"), "milestone", marker="o", markersize=3.5
        )
        mark_train_length(panel_ax, train_length)
        finish_axes(panel_ax, "milestone (tokens)", label, ybottom=0)
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
    fig, (time_ax, memory_ax) = new_axes(None, 2)
    for method, rows in frame.groupby("method", sort=False):
        color = method_color(method)
        previous = rows["length"].shift()
        spans = rows.assign(middle=(previous + rows["length"]) / 2).dropna(subset=["marginal_ms_per_token"])
        time_ax.plot(spans["middle"], spans["marginal_ms_per_token"], "o-", color=color, label=method)
        memory_ax.plot(rows["length"], rows["peak_gib"], "o-", color=color, label=method)
    for ax, label in ((time_ax, "marginal time per token (ms)"), (memory_ax, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        mark_train_length(ax, train_length)
        finish_axes(ax, "sequence length (tokens)", label, ybottom=0)
    figure_legend(fig, [time_ax, memory_ax])
    return fig
