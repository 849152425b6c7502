"""The oodlens figure style: one palette with a fixed colour per method, seaborn's paper context, and figures
saved as vector PDF plus a 300-dpi PNG."""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import matplotlib
import seaborn as sns
from matplotlib.figure import Figure

from ..storage import atomic_path

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
# Every method's colour, line style and marker, in the order figures list methods: colour alone cannot tell
# fourteen methods apart, colour with dashes and markers can (and survives greyscale printing).
METHOD_STYLES: dict[str, tuple[str, Any, str | None]] = {
    "vanilla": (OKABE_ITO["vermillion"], "-", "o"),
    "truncated": (OKABE_ITO["grey"], (0, (4, 2)), None),
    "lm-infinite": (OKABE_ITO["blue"], "-", "s"),
    "window": (OKABE_ITO["orange"], (0, (6, 2)), "v"),
    "lambda": (OKABE_ITO["green"], "-.", "^"),
    "distance-limit": (OKABE_ITO["purple"], ":", "D"),
    "streaming-llm": (OKABE_ITO["sky"], "-", "P"),
    "self-extend": (OKABE_ITO["black"], (0, (4, 1, 1, 1)), "X"),
    "rerope": (OKABE_ITO["purple"], ":", "D"),
    "leaky-rerope": (OKABE_ITO["purple"], "-.", "d"),
    "string": ("#8C6D00", "-", "h"),  # Okabe & Ito's yellow, darkened to read on white
    "dual-chunk": (OKABE_ITO["green"], (0, (6, 2)), "p"),
    "pi": (OKABE_ITO["sky"], ":", "<"),
    "ntk": (OKABE_ITO["sky"], (0, (6, 2)), ">"),
    "yarn": (OKABE_ITO["orange"], "-.", "*"),
    "llama3-rope": (OKABE_ITO["black"], ":", "1"),
    "longrope": (OKABE_ITO["black"], "-.", "2"),
}
METHOD_COLORS = {name: style[0] for name, style in METHOD_STYLES.items()}
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
BAR_HATCHES = (None, "////", "....", "xxxx")  # the first, second, ... look of one colour in bar charts
PANEL_SIZE = (3.4, 2.6)  # inches per panel: two panels fill a two-column paper's text width
DPI = 300

# ---------------------------------------------------------------------------------------------------- style


def style_rc() -> dict[str, Any]:
    rc = {**sns.axes_style("ticks"), **sns.plotting_context("paper", font_scale=1.15)}
    rc.update(
        {
            "axes.prop_cycle": matplotlib.cycler(color=list(dict.fromkeys(METHOD_COLORS.values()))),
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
    matplotlib.rcParams.update(style_rc())


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context manager: the oodlens figure style inside the block, the previous settings after it."""
    with matplotlib.rc_context(style_rc()):
        yield


def styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    @wraps(plot)
    def styled(*args: Any, **kwargs: Any) -> Figure:
        with style():
            return plot(*args, **kwargs)

    return styled


def canonical(name: str) -> str:
    """A method or run label as the colour table spells it ("Before" → "vanilla", "LM_Infinite" → …)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    return METHOD_ALIASES.get(key, key)


def method_color(name: str) -> str:
    """Fixed colour of a method or run label ("before" as vanilla, "after" as lm-infinite); others: stable."""
    key = canonical(name)
    if not key:
        return UNNAMED_COLOR
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _FALLBACK_COLORS[zlib.crc32(key.encode()) % len(_FALLBACK_COLORS)]


def method_style(name: str) -> dict[str, Any]:
    """``color``, ``linestyle`` and ``marker`` of a method or run label (others: a stable colour, solid)."""
    key = canonical(name)
    if key in METHOD_STYLES:
        color, linestyle, marker = METHOD_STYLES[key]
        return {"color": color, "linestyle": linestyle, "marker": marker}
    return {"color": method_color(name), "linestyle": "-", "marker": "o"}


def method_hatch(name: str) -> str | None:
    """The hatch of a method's bars (None: plain), which with its colour sets it apart from every other."""
    return _HATCHES.get(canonical(name))


def _bar_hatches() -> dict[str, str | None]:
    """Bars have no dashes or markers: a method whose colour an earlier one already has gets a hatch, so no
    two bars of the table look alike (methods of one look, ReRoPE and the distance limit, share it)."""
    by_look: dict[tuple, str | None] = {}
    for color, linestyle, marker in METHOD_STYLES.values():
        if (color, linestyle, marker) not in by_look:
            same_color = sum(look[0] == color for look in by_look)
            by_look[color, linestyle, marker] = BAR_HATCHES[same_color]
    return {name: by_look[look] for name, look in METHOD_STYLES.items()}


_HATCHES = _bar_hatches()


def method_rank(name: str) -> int:
    """Where a method comes in every figure's order (unknown names after the known ones)."""
    key = canonical(name)
    return list(METHOD_STYLES).index(key) if key in METHOD_STYLES else len(METHOD_STYLES)


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
    metadata = {"CreationDate": None} if fmt == "pdf" else None  # reproducible PDF bytes
    with atomic_path(target) as temporary:
        fig.savefig(temporary, format=fmt, dpi=DPI, metadata=metadata, bbox_inches="tight")
    return target


def show(fig: Figure, name: str | None = None, folder: str | os.PathLike[str] | None = None) -> None:
    """Display ``fig`` once in a notebook (or on screen), save it as ``folder/name.pdf|png`` when ``folder``
    is given, and close it so it is not drawn a second time."""
    import matplotlib.pyplot as plt

    if folder is not None:
        save_figure(fig, Path(folder) / (name or "figure"))
    try:
        from IPython.display import display
    except ImportError:
        plt.show()
    else:
        display(fig)
    plt.close(fig)
