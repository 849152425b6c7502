"""Publication figures for oodlens results, in one style.

Every plotting function takes the DataFrames that the result objects' ``to_dataframe()`` (or the named
:class:`~oodlens.capture.Diagnosis` methods) return, or the result objects themselves: an argument with the
named method is asked for its frame. Several runs (before/after, or several methods) go in as a dict
``{label: frame_or_result}`` or a list, and are overlaid, each in its method's fixed colour. ``train_length``
marks the pretraining length with a dashed vertical line and a label.

Each function returns the matplotlib Figure; single-axes plots draw into ``ax`` when given one.
:func:`save_figure` writes the vector PDF and a 300-dpi PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from sklearn.decomposition import PCA

from .errors import OodlensError

# Okabe & Ito's colour-blind-safe palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "grey": "#999999",
}
METHOD_COLORS = {
    "vanilla": OKABE_ITO["vermillion"],
    "lm-infinite": OKABE_ITO["blue"],
    "window": OKABE_ITO["orange"],
    "lambda": OKABE_ITO["green"],
    "distance-limit": OKABE_ITO["purple"],
    "truncated": OKABE_ITO["grey"],
    "streaming-llm": OKABE_ITO["sky"],
    "self-extend": OKABE_ITO["black"],
}
METHOD_ALIASES = {
    "before": "vanilla",
    "after": "lm-infinite",
    "λ": "lambda",
    "lambda-mask": "lambda",
    "lm-inf": "lm-infinite",
    "lminfinite": "lm-infinite",
    "streamingllm": "streaming-llm",
    "vanilla-truncated": "truncated",
}
UNNAMED_COLOR = "#333333"
_FALLBACK_COLORS = [OKABE_ITO[k] for k in ("sky", "black", "orange", "green", "purple", "grey")]
TRAIN_LENGTH_GID = "train-length"
LN_N_GID = "ln-n"
PANEL_SIZE = (3.4, 2.6)  # inches per panel: two panels fill a two-column paper's text width
DPI = 300

Band = Literal["range", "std"] | None

# ---------------------------------------------------------------------------------------------------- style


def _style_rc() -> dict[str, Any]:
    rc = {**sns.axes_style("ticks"), **sns.plotting_context("paper", font_scale=1.15)}
    rc.update(
        {
            "axes.prop_cycle": matplotlib.cycler(color=list(METHOD_COLORS.values())),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": True,  # white, borderless: legible over lines, invisible elsewhere
            "legend.framealpha": 0.85,
            "legend.edgecolor": "none",
            "legend.fontsize": rc["legend.fontsize"] * 0.95,
            "lines.linewidth": 1.6,
            "image.cmap": "viridis",
            "savefig.dpi": DPI,
            "pdf.fonttype": 42,
            "ps.fonttype": 42,  # editable TrueType text in vector files
        }
    )
    return rc


def use_style() -> None:
    """Apply the oodlens figure style to matplotlib globally (the plotting functions apply it themselves)."""
    matplotlib.rcParams.update(_style_rc())


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context manager: the oodlens figure style inside the block, the previous settings after it."""
    with matplotlib.rc_context(_style_rc()):
        yield


def _styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    @wraps(plot)
    def styled(*args: Any, **kwargs: Any) -> Figure:
        with style():
            return plot(*args, **kwargs)

    return styled


def _canonical(name: str) -> str:
    """A method or run label as the colour table spells it ("Before" → "vanilla", "LM_Infinite" → …)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    return METHOD_ALIASES.get(key, key)


def method_color(name: str) -> str:
    """Fixed colour of a method or run label ("before" as vanilla, "after" as lm-infinite); others: stable."""
    key = _canonical(name)
    if not key:
        return UNNAMED_COLOR
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _FALLBACK_COLORS[zlib.crc32(key.encode()) % len(_FALLBACK_COLORS)]


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``fig`` as ``<path>.pdf`` (vector) and ``<path>.png`` (300 dpi); return both paths.

    Each file is written to a temporary name in the same folder and renamed, so a reader never sees half a
    file. A ``.pdf``/``.png`` suffix on ``path`` is dropped.
    """
    base = Path(path)
    if base.suffix.lower() in (".pdf", ".png"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = (_save_atomic(fig, base.with_name(base.name + suffix)) for suffix in (".pdf", ".png"))
    return pdf, png


def _save_atomic(fig: Figure, target: Path) -> Path:
    fmt = target.suffix[1:]
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    metadata = {"CreationDate": None} if fmt == "pdf" else None  # reproducible PDF bytes
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata, bbox_inches="tight")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------------------------- inputs


def _frame(data: Any, kind: str, columns: Sequence[str], source: str) -> pd.DataFrame:
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


def _is_single(data: Any, source: str) -> bool:
    return isinstance(data, pd.DataFrame) or hasattr(data, source) or hasattr(data, "to_dataframe")


def _runs(data: Any, kind: str, columns: Sequence[str], source: str = "to_dataframe") -> pd.DataFrame:
    """All runs of ``kind`` data in one frame with a ``series`` column: the run's label, its method, or both.

    ``source``: the method (or attribute) of a result object that gives the frame.
    """
    if _is_single(data, source):
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
        frame = _frame(item, kind, columns, source).copy()
        frame["series"] = _series_names(frame, label, run=i if len(labelled) > 1 else None)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _series_names(frame: pd.DataFrame, label: str, run: int | None) -> pd.Series | str:
    if "method" not in frame.columns:
        return label or (f"run {run + 1}" if run is not None else "")
    methods = frame["method"].astype(str)
    if not label:
        return methods
    return label if methods.nunique() == 1 else label + ": " + methods


def _select_layers(df: pd.DataFrame, layers: Sequence[int] | None) -> pd.DataFrame:
    if layers is None:
        return df
    missing = sorted(set(layers) - set(df["layer"]))
    if missing:
        raise OodlensError(f"layer {missing[0]} is not in the data (has {sorted(set(df['layer']))})")
    return df[df["layer"].isin(layers)]


# ------------------------------------------------------------------------------------------ shared drawing


def _bin_centres(df: pd.DataFrame) -> pd.Series:
    return (df["bin_start"] + df["bin_end"]) / 2


def _summarise(df: pd.DataFrame, x: str, value: str, band: Band) -> pd.DataFrame:
    """Mean of ``value`` per series and x, with the band's low/high (min–max or ±std over the rows)."""
    stats = df.groupby(["series", x], sort=False)[value].agg(["mean", "min", "max", "std"]).reset_index()
    spread = stats["std"].fillna(0)
    stats["low"], stats["high"] = {
        "range": (stats["min"], stats["max"]),
        "std": (stats["mean"] - spread, stats["mean"] + spread),
        None: (stats["mean"], stats["mean"]),
    }[band]
    return stats


def _band_line(ax: Axes, stats: pd.DataFrame, x: str, name: str, **line: Any) -> None:
    """One series: its mean line and, where the rows disagree, a translucent band.

    A reference baseline (vanilla-truncated) is dashed and drawn beneath, so a method that matches it stays
    visible on top.
    """
    color = method_color(name)
    if not np.allclose(stats["low"], stats["high"], equal_nan=True):
        ax.fill_between(stats[x], stats["low"], stats["high"], color=color, alpha=0.2, linewidth=0)
    if _canonical(name) == "truncated":
        line = line | {"linestyle": "--", "zorder": 1.8, "marker": None}
    ax.plot(stats[x], stats["mean"], color=color, label=name or None, **line)


def _draw_series(ax: Axes, stats: pd.DataFrame, x: str, **line: Any) -> None:
    """One line (and band) per series, in the order the runs were given, each sorted along x."""
    for name, group in stats.groupby("series", sort=False):
        _band_line(ax, group.sort_values(x), x, str(name), **line)


def _format_tokens(n: float) -> str:
    """A token count as axis text: 512, 1k (1000 or 1024), 8k, 2,500; fractions as they are."""
    if n != int(n):
        return f"{n:g}"
    for unit in (1024, 1000):
        if abs(n) >= unit and n % unit == 0:
            return f"{int(n) // unit}k"
    return f"{int(n):,}"


TOKENS_FORMATTER = FuncFormatter(lambda value, _: _format_tokens(value))


def _mark_train_length(ax: Axes, train_length: int | None, x: float | None = None) -> None:
    """Dashed vertical line at the pretraining length (or at ``x`` on a categorical axis), for the legend."""
    if train_length is None:
        return
    label = f"pretraining length ({_format_tokens(train_length)})"
    ax.axvline(
        train_length if x is None else x,
        color="0.4",
        linestyle="--",
        linewidth=1,
        zorder=1,
        label=label,
        gid=TRAIN_LENGTH_GID,
    )


def _legend(fig: Figure, axes: list[Axes], *, outside: str | None = None) -> None:
    """One legend for the figure, outside the panels so it never hides data: under a single panel, to the
    right of several (or at ``outside``)."""
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


def _new_axes(
    ax: Axes | None, n_panels: int = 1, ncols: int | None = None, **subplots: Any
) -> tuple[Figure, list[Axes]]:
    """``ax``'s figure when given (single panel only), else a new figure of ``n_panels`` panels."""
    if ax is not None:
        if n_panels != 1:
            raise OodlensError(f"this plot draws {n_panels} panels; leave ax=None")
        return ax.figure, [ax]
    _use_agg_without_display()
    import matplotlib.pyplot as plt

    ncols = min(n_panels, ncols or 4)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows),
        layout="constrained",
        squeeze=False,
        **subplots,
    )
    for extra in axes.flat[n_panels:]:
        extra.remove()
    return fig, list(axes.flat[:n_panels])


def _use_agg_without_display() -> None:
    """Non-interactive Agg backend on a Linux machine with no display, unless a backend was chosen."""
    chosen = "MPLBACKEND" in os.environ or "matplotlib.pyplot" in sys.modules
    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    if headless and not chosen:
        matplotlib.use("Agg")


def _finish(
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
    ax.xaxis.set_major_formatter(TOKENS_FORMATTER)
    if ybottom is not None:
        ax.set_ylim(bottom=ybottom)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title)


def _stat_panels(
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
    runs = _select_layers(runs, layers)
    panels = sorted(runs["layer"].unique()) if facet else [None]
    fig, axes = _new_axes(ax, len(panels), sharex=True, sharey=True)
    for panel_ax, layer in zip(axes, panels, strict=True):
        rows = runs if layer is None else runs[runs["layer"] == layer]
        stats = _summarise(rows, x, value, band)
        _draw_series(panel_ax, stats, x)
        if extra:
            extra(panel_ax, stats)
        _mark_train_length(panel_ax, train_length)
        title = None if layer is None else f"layer {layer}"
        _finish(panel_ax, *labels, title=title, logx=logx, ybottom=ybottom)
    _legend(fig, axes)
    return fig


# ------------------------------------------------------------------------------------------- diagnosis

# The columns each plot reads (a frame may carry more).
BINNED_HEAD_COLUMNS = ["layer", "head", "bin_start", "bin_end"]
MAX_LOGIT_COLUMNS = ["layer", "head", "position", "max_logit"]
HIDDEN_COLUMNS = ["layer", "bin_start", "bin_end", "norm", "cosine_to_later"]
LOGIT_STAT_LABELS = {
    "running_max": "attention logit bound",
    "max": "max attention logit",
    "mean": "mean attention logit",
    "last_query_max": "max logit of the last query",
}


@_styled
def plot_logits_by_distance(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    stat: str = "running_max",
    band: Band = "range",
    facet: bool = False,
    logx: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Attention logits against query–key distance (Fig. 1a), mean over heads with a band over heads.

    Reads the logits-by-distance frame (``Diagnosis.logits_by_distance``): columns layer, head, bin_start,
    bin_end (bins are ``[bin_start, bin_end)``) and ``stat``, one of running_max (default: the paper's logit
    bound, the last query's largest logit over all distances below x, plotted at x = bin_end), max, mean or
    last_query_max (plotted at the bin centre). x is on a log axis unless ``logx=False``. Heads of all
    selected ``layers`` are pooled, or each layer gets a panel with ``facet=True``.
    band: "range" (min–max over heads), "std" (±1 std) or None.
    """
    if stat not in LOGIT_STAT_LABELS:
        raise OodlensError(f"stat must be one of {', '.join(LOGIT_STAT_LABELS)}; got {stat!r}")
    runs = _runs(data, "logits-by-distance", [*BINNED_HEAD_COLUMNS, stat], "logits_by_distance")
    # running_max covers every distance below bin_end; the other statistics describe the bin.
    runs["distance"] = runs["bin_end"] if stat == "running_max" else _bin_centres(runs)
    return _stat_panels(
        runs,
        "distance",
        stat,
        train_length=train_length,
        layers=layers,
        facet=facet,
        band=band,
        ax=ax,
        labels=("distance i − j (tokens)", LOGIT_STAT_LABELS[stat]),
        logx=logx,
    )


@_styled
def plot_max_logit_by_position(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "range",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Largest attention logit of each query against its position, mean over heads with a band over heads.

    Reads the max-logit-by-position frame (``Diagnosis.max_logit_by_position``): layer, head, position,
    max_logit. Heads of all selected ``layers`` are pooled, or one panel per layer with ``facet=True``.
    """
    runs = _runs(data, "max-logit-by-position", MAX_LOGIT_COLUMNS, "max_logit_by_position")
    return _stat_panels(
        runs,
        "position",
        "max_logit",
        train_length=train_length,
        layers=layers,
        facet=facet,
        band=band,
        ax=ax,
        labels=("query position (tokens)", "max attention logit"),
        logx=logx,
    )


def _draw_ln_n(ax: Axes, stats: pd.DataFrame) -> None:
    positions = np.sort(stats["position"].unique())
    ax.plot(
        positions,
        np.log(positions + 0.5),  # mean keys per query of a bin [s, e): (s + e + 1) / 2
        color="black",
        linestyle="--",
        linewidth=1.1,
        label="ln n (uniform)",
        gid=LN_N_GID,
        zorder=1.5,
    )


@_styled
def plot_entropy_by_position(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "range",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Attention entropy (nats) against query position (Fig. 1b), with the uniform-attention curve ln n.

    Reads the entropy-by-position frame (``Diagnosis.entropy_by_position``): layer, head, bin_start, bin_end,
    mean (mean entropy of the bin's queries). The line is the mean over heads (and layers unless
    ``facet=True``), the band spans the heads; the dashed "ln n (uniform)" curve is the entropy of attending
    evenly to the n keys a query sees (n = position + 1; at a bin ``[s, e)``, its mean (s + e + 1) / 2).
    """
    runs = _runs(data, "entropy-by-position", [*BINNED_HEAD_COLUMNS, "mean"], "entropy_by_position")
    runs["position"] = _bin_centres(runs)
    return _stat_panels(
        runs,
        "position",
        "mean",
        train_length=train_length,
        layers=layers,
        facet=facet,
        band=band,
        ax=ax,
        labels=("query position (tokens)", "attention entropy (nats)"),
        logx=logx,
        extra=_draw_ln_n,
        ybottom=0,
    )


@_styled
def plot_sink_mass(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "range",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Attention mass on the starting (sink) tokens against query position, mean over heads with a band.

    Reads the entropy-by-position frame (``Diagnosis.entropy_by_position``): layer, head, bin_start, bin_end,
    sink_mass.
    """
    runs = _runs(data, "entropy-by-position", [*BINNED_HEAD_COLUMNS, "sink_mass"], "entropy_by_position")
    runs["position"] = _bin_centres(runs)
    return _stat_panels(
        runs,
        "position",
        "sink_mass",
        train_length=train_length,
        layers=layers,
        facet=facet,
        band=band,
        ax=ax,
        labels=("query position (tokens)", "attention on starting tokens"),
        logx=logx,
        ybottom=0,
    )


@_styled
def plot_hidden_norm(
    data: Any, train_length: int | None = None, *, layers: Sequence[int] | None = None, logx: bool = True
) -> Figure:
    """Hidden-state norm (log y) and cosine to later positions against position: one column per layer.

    Reads the hidden-by-position frame (``Diagnosis.hidden_by_position``): layer, bin_start, bin_end, norm,
    cosine_to_later. Top row: norm; bottom row: cosine_to_later; runs overlaid in each panel.
    """
    runs = _select_layers(_runs(data, "hidden-by-position", HIDDEN_COLUMNS, "hidden_by_position"), layers)
    runs["position"] = _bin_centres(runs)
    layer_ids = sorted(runs["layer"].unique())
    fig, axes = _new_axes(None, 2 * len(layer_ids), ncols=len(layer_ids), sharex=True, sharey="row")
    for row, (value, label, logy) in enumerate(
        (("norm", "hidden-state norm", True), ("cosine_to_later", "cosine to later positions", False))
    ):
        for col, layer in enumerate(layer_ids):
            panel_ax = axes[row * len(layer_ids) + col]
            _draw_series(
                panel_ax, _summarise(runs[runs["layer"] == layer], "position", value, "range"), "position"
            )
            _mark_train_length(panel_ax, train_length)
            _finish(
                panel_ax,
                "position (tokens)" if row else "",
                label if col == 0 else "",
                title=None if row else f"layer {layer}",
                logx=logx,
                logy=logy,
            )
    _legend(fig, axes)
    return fig


# --------------------------------------------------------------------------------------- hidden PCA

HiddenSamples = Callable[[int], tuple[np.ndarray, np.ndarray]]


def _hidden_source(samples: Any) -> tuple[HiddenSamples, list[int]] | None:
    """(layer → (positions, vectors), layers) for one run's samples, or None if ``samples`` is not one run."""
    if hasattr(samples, "hidden_samples"):
        meta = getattr(samples, "meta", {}) or {}
        return samples.hidden_samples, list(meta.get("hidden_layers", []))
    if (
        isinstance(samples, Mapping)
        and samples
        and all(isinstance(v, tuple) and len(v) == 2 for v in samples.values())
    ):
        return lambda layer: samples[layer], sorted(samples)
    return None


def _hidden_runs(samples: Any) -> list[tuple[str, HiddenSamples, list[int]]]:
    single = _hidden_source(samples)
    if single is not None:
        return [("", *single)]
    items = samples.items() if isinstance(samples, Mapping) else enumerate(samples, start=1)
    runs = []
    for label, item in items:
        source = _hidden_source(item)
        if source is None:
            raise OodlensError(
                "hidden samples: expected {layer: (positions, vectors)} or an object with "
                f"hidden_samples(layer); got {type(item).__name__}"
            )
        runs.append((str(label) if isinstance(samples, Mapping) else f"run {label}", *source))
    return runs


def _layer_samples(
    get: HiddenSamples, layer: int, max_points: int | None, first_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        positions, vectors = get(layer)
    except (KeyError, IndexError) as err:
        raise OodlensError(f"hidden samples have no layer {layer}") from err
    positions, vectors = np.asarray(positions), np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(positions) != len(vectors) or len(vectors) < 3:
        raise OodlensError(
            f"hidden samples of layer {layer}: need positions [N] and vectors [N, d] with N ≥ 3; "
            f"got {positions.shape} and {vectors.shape}"
        )
    if max_points is not None and len(positions) > max_points:
        rest = np.flatnonzero(positions >= first_tokens)
        keep_rest = np.random.default_rng(0).choice(
            rest, size=max(max_points - (len(positions) - len(rest)), 0), replace=False
        )
        keep = np.sort(np.concatenate([np.flatnonzero(positions < first_tokens), keep_rest]))
        positions, vectors = positions[keep], vectors[keep]
    return positions, vectors


def _pca_panel(
    ax: Axes, positions: np.ndarray, vectors: np.ndarray, norm: LogNorm, first_tokens: int
) -> None:
    pca = PCA(n_components=2).fit(vectors)
    xy = pca.transform(vectors)
    first = positions < first_tokens
    ax.scatter(
        xy[~first, 0],
        xy[~first, 1],
        c=positions[~first] + 1,
        cmap="viridis",
        norm=norm,
        s=3,
        alpha=0.6,
        linewidths=0,
        rasterized=True,
    )
    ax.scatter(
        xy[first, 0],
        xy[first, 1],
        c=positions[first] + 1,
        cmap="viridis",
        norm=norm,
        s=28,
        edgecolors="black",
        linewidths=0.6,
        zorder=3,
        label=f"positions < {first_tokens}",
    )
    ratio = pca.explained_variance_ratio_ * 100
    ax.set(xlabel=f"PC1 ({ratio[0]:.0f}%)", ylabel=f"PC2 ({ratio[1]:.0f}%)", xticks=[], yticks=[])


@_styled
def plot_hidden_pca(
    samples: Any,
    layers: Sequence[int] | None = None,
    *,
    first_tokens: int = 25,
    max_points: int | None = 20_000,
) -> Figure:
    """2-D PCA of hidden states per layer (Fig. 1c), points coloured by position on a log colour scale.

    samples: ``{layer: (positions [N], vectors [N, d])}``, an object with ``hidden_samples(layer)`` (layers
    from ``meta["hidden_layers"]``), or a dict/list of those (one row per run, e.g. before/after). Layers
    sit side by side; each panel has its own PCA fit. Positions below ``first_tokens`` are drawn large with
    a black edge. At most ``max_points`` points per panel (a fixed random subset; the first tokens always).
    """
    runs = _hidden_runs(samples)
    layers = list(layers) if layers is not None else runs[0][2]
    if not layers:
        raise OodlensError("hidden samples: no layers given and none listed in meta['hidden_layers']")
    panels = [
        [_layer_samples(get, layer, max_points, first_tokens) for layer in layers] for _, get, _ in runs
    ]
    top = max(float(pos.max()) for row in panels for pos, _ in row) + 1
    norm = LogNorm(vmin=1, vmax=max(top, 2))
    fig, axes = _new_axes(None, len(runs) * len(layers), ncols=len(layers))
    for r, ((label, _, _), row) in enumerate(zip(runs, panels, strict=True)):
        for c, (layer, (positions, vectors)) in enumerate(zip(layers, row, strict=True)):
            panel_ax = axes[r * len(layers) + c]
            _pca_panel(panel_ax, positions, vectors, norm, first_tokens)
            panel_ax.set_title(f"{label} · layer {layer}" if label else f"layer {layer}")
    axes[0].legend(loc="best", markerscale=0.8)
    colorbar = fig.colorbar(
        ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="position + 1", shrink=0.9
    )
    colorbar.ax.yaxis.set_major_formatter(TOKENS_FORMATTER)
    return fig


# ------------------------------------------------------------------------------------------ evaluation

PERPLEXITY_COLUMNS = ["start", "end", "nll", "n_tokens"]  # method optional (StreamingResult has none)
PASSKEY_COLUMNS = ["method", "length", "depth", "correct"]
GENERATION_COLUMNS = ["method", "milestone", "bleu", "rouge_l"]
COMPARISON_COLUMNS = ["method", "metric", "value"]


@_styled
def plot_perplexity_by_position(
    data: Any, train_length: int | None = None, *, ax: Axes | None = None
) -> Figure:
    """Perplexity per position bucket (Fig. 3), one line per method, log y, bucket centres on x.

    Reads the perplexity frame (``PerplexityResult`` or ``StreamingResult.to_dataframe``): start, end, nll
    (mean per token), n_tokens, and method where there is one (else the dict label names the line). Rows
    of the same method and bucket (e.g. several documents) are pooled token-weighted: exp(Σ nll·n / Σ n).
    Buckets whose nll is NaN or infinite (a model that overflowed) are left off.
    """
    runs = _runs(data, "perplexity", PERPLEXITY_COLUMNS)
    runs["position"] = (runs["start"] + runs["end"]) / 2
    runs["weighted"] = runs["nll"].fillna(np.inf) * runs["n_tokens"]  # a NaN bucket stays off the plot
    pooled = runs.groupby(["series", "position"], sort=False)[["weighted", "n_tokens"]].sum().reset_index()
    pooled["mean"] = np.exp(pooled["weighted"] / pooled["n_tokens"])
    pooled["low"] = pooled["high"] = pooled["mean"]
    fig, (panel_ax,) = _new_axes(ax)
    _draw_series(panel_ax, pooled, "position", marker="o", markersize=3.5)
    _mark_train_length(panel_ax, train_length)
    _finish(panel_ax, "position (tokens)", "perplexity", logy=True)
    _legend(fig, [panel_ax])
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
        xticklabels=[_format_tokens(n) for n in grid.columns],
        yticklabels=[f"{d:g}" for d in grid.index],
    )
    if train_length is not None and 0 < (boundary := int((grid.columns <= train_length).sum())) < len(
        grid.columns
    ):
        _mark_train_length(ax, train_length, x=boundary)
    ax.set(xlabel="length (tokens)", ylabel="needle depth")
    ax.tick_params(axis="y", rotation=0)


@_styled
def plot_passkey_heatmap(data: Any, train_length: int | None = None) -> Figure:
    """Passkey accuracy as a length × depth heat map (Table 2), one panel per method, cells annotated.

    Reads the passkey frame (``PasskeyResult.to_dataframe``): method, length, depth, correct; accuracy is
    the mean of ``correct`` over samples. Colour scale fixed to 0–1, one colour bar for all panels.
    """
    runs = _runs(data, "passkey", PASSKEY_COLUMNS)
    runs["correct"] = runs["correct"].astype(float)
    accuracy = runs.groupby(["series", "length", "depth"], sort=False)["correct"].mean().reset_index()
    names = list(accuracy["series"].unique())
    fig, axes = _new_axes(None, len(names), sharey=True)
    for panel_ax, name in zip(axes, names, strict=True):
        _passkey_panel(panel_ax, accuracy[accuracy["series"] == name], train_length)
        panel_ax.set_title(name)
        if panel_ax is not axes[0]:
            panel_ax.set_ylabel("")
    _legend(fig, axes, outside="outside lower center")
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap="viridis"), ax=axes, label="accuracy", shrink=0.9)
    return fig


@_styled
def plot_method_comparison(
    data: Any, *, metrics: Sequence[str] | None = None, facet: bool = False, ax: Axes | None = None
) -> Figure:
    """Grouped bars: one group per metric, one bar per method, value labels on the bars.

    Reads any tidy frame with columns method, metric, value; repeated rows are averaged with a ±1 std
    error bar. ``metrics`` picks and orders them. Metrics on different scales read better with
    ``facet=True``: one panel per metric, each on its own y axis.
    """
    runs = _runs(data, "method-comparison", COMPARISON_COLUMNS)
    metrics = list(metrics) if metrics is not None else list(runs["metric"].unique())
    missing = sorted(set(metrics) - set(runs["metric"]))
    if missing:
        raise OodlensError(f"metric {missing[0]!r} is not in the data (has {sorted(set(runs['metric']))})")
    runs = runs[runs["metric"].isin(metrics)]
    palette = {name: method_color(name) for name in runs["series"].unique()}
    if not facet:
        fig, (panel_ax,) = _new_axes(ax)
        _bars(panel_ax, runs, palette, x="metric", order=metrics)
        return fig
    fig, axes = _new_axes(ax, len(metrics))
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


@_styled
def plot_generation_quality(data: Any, train_length: int | None = None) -> Figure:
    """BLEU and ROUGE-L of the continuation generated after each milestone length (Table 3), per method.

    Reads the generation frame (``GenerationResult.to_dataframe``): method, milestone, bleu, rouge_l.
    Repeated rows (samples) are averaged, with a ±1 std band.
    """
    runs = _runs(data, "generation", GENERATION_COLUMNS)
    fig, axes = _new_axes(None, 2, sharex=True)
    for panel_ax, (value, label) in zip(axes, (("bleu", "BLEU"), ("rouge_l", "ROUGE-L")), strict=True):
        _draw_series(
            panel_ax, _summarise(runs, "milestone", value, "std"), "milestone", marker="o", markersize=3.5
        )
        _mark_train_length(panel_ax, train_length)
        _finish(panel_ax, "milestone (tokens)", label, ybottom=0)
    _legend(fig, axes)
    return fig


__all__ = [
    "METHOD_COLORS",
    "method_color",
    "plot_entropy_by_position",
    "plot_generation_quality",
    "plot_hidden_norm",
    "plot_hidden_pca",
    "plot_logits_by_distance",
    "plot_max_logit_by_position",
    "plot_method_comparison",
    "plot_passkey_heatmap",
    "plot_perplexity_by_position",
    "plot_sink_mass",
    "save_figure",
    "style",
    "use_style",
]
