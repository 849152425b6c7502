"""Figures of a :class:`~oodlens.capture.Diagnosis`: the three factors (Fig. 1a–d of the paper)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from ..errors import OodlensError
from .base import (
    TOKENS_FORMATTER,
    Band,
    bin_centres,
    draw_series,
    figure_legend,
    finish_axes,
    mark_train_length,
    new_axes,
    run_frames,
    select_layers,
    stat_panels,
    summarise,
)
from .style import LN_N_GID, styled

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


@styled
def plot_logits_by_distance(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    stat: str = "running_max",
    band: Band = "iqr",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Attention logits against query–key distance (Fig. 1a), median over heads with a band over heads.

    Reads the logits-by-distance frame (``Diagnosis.logits_by_distance``): columns layer, head, bin_start,
    bin_end (bins are ``[bin_start, bin_end)``) and ``stat``, one of running_max (default: the paper's logit
    bound, the last query's largest logit over all distances below x, plotted at x = bin_end), max, mean or
    last_query_max (plotted at the bin centre). x is linear, as in the paper, so the distances beyond the
    pretraining length take the room they need (``logx=True`` shows the nearest distances instead). Heads of
    all selected ``layers`` are pooled, or each layer gets a panel with ``facet=True``.
    band: "iqr" (median and interquartile range over heads), "range" (mean, min–max), "std" (mean ± 1 std)
    or None.
    """
    if stat not in LOGIT_STAT_LABELS:
        raise OodlensError(f"stat must be one of {', '.join(LOGIT_STAT_LABELS)}; got {stat!r}")
    runs = run_frames(data, "logits-by-distance", [*BINNED_HEAD_COLUMNS, stat], "logits_by_distance")
    # running_max covers every distance below bin_end; the other statistics describe the bin.
    runs["distance"] = runs["bin_end"] if stat == "running_max" else bin_centres(runs)
    return stat_panels(
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


@styled
def plot_max_logit_by_position(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "iqr",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Largest attention logit of each query against its position, median over heads with its interquartile
    band (see ``band`` of :func:`plot_logits_by_distance`).

    Reads the max-logit-by-position frame (``Diagnosis.max_logit_by_position``): layer, head, position,
    max_logit. Heads of all selected ``layers`` are pooled, or one panel per layer with ``facet=True``.
    """
    runs = run_frames(data, "max-logit-by-position", MAX_LOGIT_COLUMNS, "max_logit_by_position")
    return stat_panels(
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


@styled
def plot_entropy_by_position(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "iqr",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Attention entropy (nats) against query position (Fig. 1b), with the uniform-attention curve ln n.

    Reads the entropy-by-position frame (``Diagnosis.entropy_by_position``): layer, head, bin_start, bin_end,
    mean (mean entropy of the bin's queries). The line is the median over heads (and layers unless
    ``facet=True``), the band their interquartile range; the dashed "ln n (uniform)" curve is the entropy of
    attending evenly to the n keys a query sees (n = position + 1; at a bin ``[s, e)``, its mean
    (s + e + 1) / 2).
    """
    return _entropy_frame_panels(
        data,
        "mean",
        "attention entropy (nats)",
        dict(train_length=train_length, layers=layers, facet=facet, band=band, ax=ax, logx=logx),
        extra=_draw_ln_n,
    )


@styled
def plot_sink_mass(
    data: Any,
    train_length: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    band: Band = "iqr",
    facet: bool = False,
    logx: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Attention mass on the starting (sink) tokens against query position, median over heads with its
    interquartile band.

    Reads the entropy-by-position frame (``Diagnosis.entropy_by_position``): layer, head, bin_start, bin_end,
    sink_mass.
    """
    return _entropy_frame_panels(
        data,
        "sink_mass",
        "attention on starting tokens",
        dict(train_length=train_length, layers=layers, facet=facet, band=band, ax=ax, logx=logx),
    )


def _entropy_frame_panels(
    data: Any,
    column: str,
    ylabel: str,
    panel_options: dict[str, Any],
    extra: Callable[[Axes, pd.DataFrame], None] | None = None,
) -> Figure:
    """A column of the entropy-by-position frame against query position (the body of Fig. 1b and the sink
    plot)."""
    runs = run_frames(data, "entropy-by-position", [*BINNED_HEAD_COLUMNS, column], "entropy_by_position")
    runs["position"] = bin_centres(runs)
    labels = ("query position (tokens)", ylabel)
    return stat_panels(runs, "position", column, labels=labels, extra=extra, ybottom=0, **panel_options)


@styled
def plot_hidden_norm(
    data: Any, train_length: int | None = None, *, layers: Sequence[int] | None = None, logx: bool = True
) -> Figure:
    """Hidden-state norm (log y) and cosine to later positions against position: one column per layer.

    Reads the hidden-by-position frame (``Diagnosis.hidden_by_position``): layer, bin_start, bin_end, norm,
    cosine_to_later. Top row: norm; bottom row: cosine_to_later; runs overlaid in each panel.
    """
    runs = select_layers(run_frames(data, "hidden-by-position", HIDDEN_COLUMNS, "hidden_by_position"), layers)
    runs["position"] = bin_centres(runs)
    layer_ids = sorted(runs["layer"].unique())
    fig, axes = new_axes(None, 2 * len(layer_ids), ncols=len(layer_ids), sharex=True, sharey="row")
    for row, (value, label, logy) in enumerate(
        (("norm", "hidden-state norm", True), ("cosine_to_later", "cosine to later positions", False))
    ):
        for col, layer in enumerate(layer_ids):
            panel_ax = axes[row * len(layer_ids) + col]
            draw_series(
                panel_ax, summarise(runs[runs["layer"] == layer], "position", value, "range"), "position"
            )
            mark_train_length(panel_ax, train_length)
            finish_axes(
                panel_ax,
                "position (tokens)" if row else "",
                label if col == 0 else "",
                title=None if row else f"layer {layer}",
                logx=logx,
                logy=logy,
            )
    figure_legend(fig, axes)
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
    get: HiddenSamples, layer: int, max_points: int | None, n_global: int
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
    finite = np.isfinite(vectors).all(axis=1)  # states that overflowed (the capture warned) are left out
    positions, vectors = positions[finite], vectors[finite]
    if max_points is not None and len(positions) > max_points:
        rest = np.flatnonzero(positions >= n_global)
        keep_rest = np.random.default_rng(0).choice(
            rest, size=max(max_points - (len(positions) - len(rest)), 0), replace=False
        )
        keep = np.sort(np.concatenate([np.flatnonzero(positions < n_global), keep_rest]))
        positions, vectors = positions[keep], vectors[keep]
    return positions, vectors


def _pca_panel(ax: Axes, positions: np.ndarray, vectors: np.ndarray, norm: LogNorm, n_global: int) -> None:
    """PCA fitted without the hidden states of outlying norm (position 0 and the few other tokens with massive
    activations, which would take the first components alone), every point then projected; the view spans the
    fitted points, and points beyond it are pinned to its edge as crosses. A panel with fewer than 3 finite
    states says so."""
    if len(vectors) < 3:
        ax.text(0.5, 0.5, "no finite hidden states", ha="center", va="center", transform=ax.transAxes)
        ax.set(xticks=[], yticks=[])
        return
    norms = np.linalg.norm(vectors, axis=1)
    q1, q3 = np.percentile(norms, [25, 75])
    fitted = (norms <= q3 + 3 * (q3 - q1)) & (positions > 0)
    pca = PCA(n_components=2).fit(vectors[fitted] if fitted.sum() >= 3 else vectors)
    xy = pca.transform(vectors)
    low, high = np.percentile(xy[fitted], [0.5, 99.5], axis=0)
    pad = 0.08 * (high - low)
    low, high = low - pad, high + pad
    outside = ((xy < low) | (xy > high)).any(axis=1)
    shown = np.clip(xy, low, high)
    first = positions < n_global
    common = {"cmap": "viridis", "norm": norm}
    for selected, look in (
        (~first & ~outside, {"s": 3, "alpha": 0.6, "linewidths": 0, "rasterized": True}),
        (first & ~outside, {"s": 28, "edgecolors": "black", "linewidths": 0.6, "zorder": 3,
                            "label": f"positions < {n_global}"}),
        (outside, {"s": 36, "marker": "X", "edgecolors": "black", "linewidths": 0.5, "zorder": 4,
                   "label": "off-scale (at the edge)"}),
    ):  # fmt: skip
        if selected.any():
            ax.scatter(shown[selected, 0], shown[selected, 1], c=positions[selected] + 1, **(common | look))
    ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]))
    ratio = pca.explained_variance_ratio_ * 100
    ax.set(xlabel=f"PC1 ({ratio[0]:.0f}%)", ylabel=f"PC2 ({ratio[1]:.0f}%)", xticks=[], yticks=[])


def _default_pca_layers(available: list[int]) -> list[int]:
    """At most three layers: the second (the paper's Fig. 1c), the middle and the last one captured."""
    if len(available) <= 3:
        return available
    return sorted({available[min(1, len(available) - 1)], available[len(available) // 2], available[-1]})


@styled
def plot_hidden_pca(
    samples: Any,
    layers: Sequence[int] | None = None,
    *,
    n_global: int = 25,
    max_points: int | None = 20_000,
) -> Figure:
    """2-D PCA of hidden states per layer (Fig. 1c), points coloured by position on a log colour scale.

    samples: ``{layer: (positions [N], vectors [N, d])}``, an object with ``hidden_samples(layer)`` (layers
    from ``meta["hidden_layers"]``), or a dict/list of those (one row per run, e.g. before/after). Layers
    (default: at most three of those captured) sit side by side, one row per run; each panel has its own PCA,
    fitted without the states of outlying norm (position 0 and the few other tokens with massive activations,
    which would otherwise take the first components alone), then projected like every point. Positions below
    ``n_global`` are drawn large with a black edge; points beyond the view of the fitted ones sit at its edge
    as crosses. At most ``max_points`` points per panel (a fixed random subset; the first tokens always).
    """
    runs = _hidden_runs(samples)
    layers = list(layers) if layers is not None else _default_pca_layers(runs[0][2])
    if not layers:
        raise OodlensError("hidden samples: no layers given and none listed in meta['hidden_layers']")
    panels = [[_layer_samples(get, layer, max_points, n_global) for layer in layers] for _, get, _ in runs]
    top = max((float(pos.max()) for row in panels for pos, _ in row if len(pos)), default=1.0) + 1
    norm = LogNorm(vmin=1, vmax=max(top, 2))
    fig, axes = new_axes(None, len(runs) * len(layers), ncols=len(layers))
    for r, ((label, _, _), row) in enumerate(zip(runs, panels, strict=True)):
        for c, (layer, (positions, vectors)) in enumerate(zip(layers, row, strict=True)):
            panel_ax = axes[r * len(layers) + c]
            _pca_panel(panel_ax, positions, vectors, norm, n_global)
            panel_ax.set_title(f"{label} · layer {layer}" if label else f"layer {layer}")
    figure_legend(fig, axes)
    colorbar = fig.colorbar(
        ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="position + 1", shrink=0.9
    )
    colorbar.ax.yaxis.set_major_formatter(TOKENS_FORMATTER)
    return fig
