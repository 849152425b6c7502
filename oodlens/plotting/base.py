"""What every plot shares: reading result objects or frames (one run or several), the mean-and-band line,
token-count axes, the pretraining-length marker, the legend outside the panels, and panel grids."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..errors import OodlensError
from .style import PANEL_SIZE, TRAIN_LENGTH_GID, canonical, method_rank, method_style

Band = Literal["iqr", "range", "std"] | None

# ----------------------------------------------------------------------------------------------- inputs


def as_frame(data: Any, kind: str, columns: Sequence[str], source: str) -> pd.DataFrame:
    """The DataFrame behind ``data``: itself, its ``source`` method/attribute, or its ``to_dataframe()``."""
    if not isinstance(data, pd.DataFrame):
        names = list(dict.fromkeys((source, "to_dataframe")))
        getter = next((getattr(data, name) for name in names if hasattr(data, name)), None)
        if getter is None:
            wanted = " or ".join(f"{name}()" for name in names)
            raise OodlensError(
                f"{kind} data: expected a DataFrame or an object with {wanted}; got {type(data).__name__}"
            )
        data = getter() if callable(getter) else getter
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise OodlensError(
            f"{kind} data lacks column {missing[0]!r} (needs {', '.join(columns)}; "
            f"has {', '.join(map(str, data.columns))})"
        )
    if data.empty:
        raise OodlensError(f"{kind} data has no rows")
    return data


def is_single(data: Any, source: str) -> bool:
    return isinstance(data, pd.DataFrame) or hasattr(data, source) or hasattr(data, "to_dataframe")


def run_frames(data: Any, kind: str, columns: Sequence[str], source: str = "to_dataframe") -> pd.DataFrame:
    """All runs of ``kind`` data in one frame with a ``series`` column: the run's label, its method, or both.

    ``source``: the method (or attribute) of a result object that gives the frame.
    """
    if is_single(data, source):
        labelled = [("", data)]
    elif isinstance(data, Mapping):
        labelled = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, Sequence) and not isinstance(data, str):
        labelled = [("", v) for v in data]
    else:
        raise OodlensError(
            f"{kind} data: expected a DataFrame, a result object, or a dict/list of them; "
            f"got {type(data).__name__}"
        )
    frames = []
    for i, (label, item) in enumerate(labelled):
        frame = as_frame(item, kind, columns, source).copy()
        frame["series"] = series_names(frame, label, run=i if len(labelled) > 1 else None)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def series_names(frame: pd.DataFrame, label: str, run: int | None) -> pd.Series | str:
    if "method" not in frame.columns:
        return label or (f"run {run + 1}" if run is not None else "")
    methods = frame["method"].astype(str)
    if not label:
        return methods
    return label if methods.nunique() == 1 else label + ": " + methods


def select_layers(df: pd.DataFrame, layers: Sequence[int] | None) -> pd.DataFrame:
    if layers is None:
        return df
    missing = sorted(set(layers) - set(df["layer"]))
    if missing:
        raise OodlensError(f"layer {missing[0]} is not in the data (has {sorted(set(df['layer']))})")
    return df[df["layer"].isin(layers)]


# ------------------------------------------------------------------------------------------ shared drawing


def bin_centres(df: pd.DataFrame) -> pd.Series:
    return (df["bin_start"] + df["bin_end"]) / 2


def summarise(df: pd.DataFrame, x: str, value: str, band: Band) -> pd.DataFrame:
    """The centre of ``value`` per series and x with the band's ``low``/``high``: median and interquartile
    range (``"iqr"``), mean and min–max (``"range"``), mean ± std (``"std"``), or the mean alone (None)."""
    grouped = df.groupby(["series", x], sort=False)[value]
    stats = grouped.agg(["mean", "median", "min", "max", "std"]).reset_index()
    if band == "iqr":
        stats["mean"] = stats["median"]  # the centre the band surrounds
        stats["low"] = grouped.quantile(0.25).to_numpy()
        stats["high"] = grouped.quantile(0.75).to_numpy()
        return stats
    spread = stats["std"].fillna(0)
    stats["low"], stats["high"] = {
        "range": (stats["min"], stats["max"]),
        "std": (stats["mean"] - spread, stats["mean"] + spread),
        None: (stats["mean"], stats["mean"]),
    }[band]
    return stats


def band_line(
    ax: Axes, stats: pd.DataFrame, x: str, name: str, *, markers: bool = False, **line: Any
) -> None:
    """One series in its method's colour, dashes (and markers, for sparse points): its centre line and, where
    the rows disagree, a translucent band. The reference baseline (vanilla-truncated) is a thin dark dashed
    line on top, so a method that matches it stays visible beneath.
    """
    look = method_style(name)
    if not np.allclose(stats["low"], stats["high"], equal_nan=True):
        ax.fill_between(stats[x], stats["low"], stats["high"], color=look["color"], alpha=0.18, linewidth=0)
    if not markers:
        look["marker"] = None
    if (
        canonical(name) == "truncated"
    ):  # thin and on top: a method equal to the baseline stays visible beneath
        line = line | {"zorder": 3, "linewidth": 1.1, "color": "#444444"}
    ax.plot(stats[x], stats["mean"], label=name or None, markersize=4, **(look | line))


def draw_series(ax: Axes, stats: pd.DataFrame, x: str, **line: Any) -> None:
    """One line (and band) per series, methods in the order every figure uses, each sorted along x."""
    names = sorted(stats["series"].unique(), key=lambda name: method_rank(str(name)))
    for name in names:
        band_line(ax, stats[stats["series"] == name].sort_values(x), x, str(name), **line)


def format_tokens(n: float) -> str:
    """A token count as axis text, one style on every axis: 512, 1k (1,000 or 1,024), 2.5k, 8k, 128k, 1M."""
    if n != int(n):
        return f"{n:g}"
    n = int(n)
    for unit, suffix in ((1 << 20, "M"), (1_000_000, "M"), (1024, "k"), (1000, "k")):
        if abs(n) >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if abs(n) >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return f"{n:,}"


TOKENS_FORMATTER = FuncFormatter(lambda value, _: format_tokens(value))
NUMBER_FORMATTER = FuncFormatter(lambda value, _: f"{value:g}" if value < 1e4 else format_tokens(value))


def mark_train_length(ax: Axes, train_length: int | None, x: float | None = None) -> None:
    """Dashed vertical line at the pretraining length (or at ``x`` on a categorical axis), for the legend."""
    if train_length is None:
        return
    label = f"pretraining length ({format_tokens(train_length)})"
    ax.axvline(
        train_length if x is None else x,
        color="0.4",
        linestyle="--",
        linewidth=1,
        zorder=1,
        label=label,
        gid=TRAIN_LENGTH_GID,
    )


def figure_legend(
    fig: Figure, axes: list[Axes], *, outside: str | None = None, own_figure: bool = True
) -> None:
    """One legend for the figure, outside the panels so it never hides data: under a single panel, to the
    right of several (or at ``outside``). In a panel the caller gave (``own_figure=False``) the legend stays
    inside that panel, so composed figures do not collide."""
    if not own_figure:
        axes[0].legend(loc="best", fontsize="small")
        return
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:
        return
    loc = outside or ("outside right upper" if len(axes) > 1 else "outside lower center")
    below = "center" in loc  # a row under (or over) the panels
    fig.legend(
        entries.values(),
        entries.keys(),
        loc=loc,
        ncols=2 if below else 1,
        fontsize="small" if below else None,
    )


def new_axes(
    ax: Axes | None, n_panels: int = 1, ncols: int | None = None, **subplots: Any
) -> tuple[Figure, list[Axes]]:
    """``ax``'s figure when given (single panel only), else a new figure of ``n_panels`` panels."""
    if ax is not None:
        if n_panels != 1:
            raise OodlensError(f"this plot draws {n_panels} panels; leave ax=None")
        return ax.figure, [ax]
    use_agg_without_display()
    import matplotlib.pyplot as plt

    ncols = min(n_panels, ncols or 4)
    nrows = math.ceil(n_panels / ncols)
    subplots.setdefault("figsize", (PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        layout="constrained",
        squeeze=False,
        **subplots,
    )
    for extra in axes.flat[n_panels:]:
        extra.remove()
    return fig, list(axes.flat[:n_panels])


def use_agg_without_display() -> None:
    """Non-interactive Agg backend on a Linux machine with no display, unless a backend was chosen."""
    chosen = "MPLBACKEND" in os.environ or "matplotlib.pyplot" in sys.modules
    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    if headless and not chosen:
        matplotlib.use("Agg")


def finish_axes(
    ax: Axes,
    xlabel: str,
    ylabel: str,
    *,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    ybottom: float | None = None,
) -> None:
    """Scales, labels and title of a panel whose x axis counts tokens (ticks read 500, 1k, 4k, …)."""
    if logx:
        ax.set_xscale("log", nonpositive="mask")
    if logy:
        ax.set_yscale("log", nonpositive="mask")
        low, high = ax.get_ylim()
        # 1-2-5 ticks over up to two decades; past that decades only (matplotlib drops 1-2-5 ticks altogether
        # on a short axis over many decades), never fewer than it can fit
        subs = (1.0, 2.0, 5.0) if high <= 100 * low else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(subs=subs, numticks=15))
        ax.yaxis.set_major_formatter(NUMBER_FORMATTER)
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(TOKENS_FORMATTER)
    if ybottom is not None:
        ax.set_ylim(bottom=ybottom)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title)


def stat_panels(
    runs: pd.DataFrame,
    x: str,
    value: str,
    *,
    train_length: int | None,
    layers: Sequence[int] | None,
    facet: bool,
    band: Band,
    ax: Axes | None,
    labels: tuple[str, str],
    logx: bool,
    extra: Callable[[Axes, pd.DataFrame], None] | None = None,
    ybottom: float | None = None,
) -> Figure:
    """Mean of ``value`` over heads (and layers unless faceted) against ``x``: one line + band per series."""
    runs = select_layers(runs, layers)
    panels = sorted(runs["layer"].unique()) if facet else [None]
    fig, axes = new_axes(ax, len(panels), sharex=True, sharey=True)
    for panel_ax, layer in zip(axes, panels, strict=True):
        rows = runs if layer is None else runs[runs["layer"] == layer]
        stats = summarise(rows, x, value, band)
        draw_series(panel_ax, stats, x)
        if extra:
            extra(panel_ax, stats)
        mark_train_length(panel_ax, train_length)
        title = None if layer is None else f"layer {layer}"
        finish_axes(panel_ax, *labels, title=title, logx=logx, ybottom=ybottom)
    figure_legend(fig, axes, own_figure=ax is None)
    return fig
