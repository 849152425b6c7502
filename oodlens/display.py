"""How result objects show themselves: a one-line ``repr`` and a small HTML card in Jupyter, both built from
the object's headline numbers (never its tables, which can hold millions of rows)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any


def format_number(value: Any) -> str:
    """A number as reports show it: 3 significant digits, scientific from 10⁴, ∞ for overflow, – for none;
    anything else as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "∞" if value > 0 else ("n/a" if math.isnan(value) else "-∞")
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def estimate_text(estimate: Mapping[str, Any] | None, *, count: bool = False) -> str:
    """An :meth:`~oodlens.stats.Estimate.to_dict` as reports write it: ``8.19 [7.9, 8.5]`` (the interval where
    there is one); ``count`` writes a proportion as ``correct/n [low, high]``; ``–`` for none."""
    if not estimate:
        return "–"
    value, low, high, n = (estimate.get(key) for key in ("value", "low", "high", "n"))
    text = f"{round(value * n)}/{n}" if count and value is not None else format_number(value)
    if low is None or high is None:
        return text
    return f"{text} [{format_number(low)}, {format_number(high)}]"


def ratio_text(estimate: Mapping[str, Any] | None) -> str:
    """A ratio's :meth:`~oodlens.stats.Estimate.to_dict` as reports write it: near 1 (within 2× either way)
    the difference in percent, ``+0.04 % [-0.02, +0.10]``, whose digits 3 significant digits of the ratio
    would hide; else ``8.29× [7.6, 9.1]``; ``–`` for none."""
    if not estimate or estimate.get("value") is None:
        return "–"
    value, low, high = (estimate.get(key) for key in ("value", "low", "high"))
    if not 0.5 < value < 2:
        interval = "" if low is None or high is None else f" [{format_number(low)}, {format_number(high)}]"
        return f"{format_number(value)}×{interval}"

    def percent(ratio: float) -> str:
        return f"{100 * (ratio - 1):+.2f}"

    interval = "" if low is None or high is None else f" [{percent(low)}, {percent(high)}]"
    return f"{percent(value)} %{interval}"


def short_repr(kind: str, headline: Mapping[str, Any]) -> str:
    """``Kind(key=value, …)`` with numbers to 3 significant digits."""
    return f"{kind}(" + ", ".join(f"{key}={format_number(value)}" for key, value in headline.items()) + ")"


def html_card(
    kind: str, headline: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """A titled list of the headline numbers, and optionally a small table (``{row: {column: value}}``)."""
    items = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(key))}</th>"
        f"<td>{html.escape(format_number(value))}</td></tr>"
        for key, value in headline.items()
    )
    parts = [f"<div><b>{html.escape(kind)}</b><table>{items}</table>"]
    if rows:
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
        head = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(name))}</th>"
            + "".join(f"<td>{html.escape(format_number(row.get(column, '')))}</td>" for column in columns)
            + "</tr>"
            for name, row in rows.items()
        )
        parts.append(f"<table><tr><th></th>{head}</tr>{body}</table>")
    return "".join(parts) + "</div>"


class Displayed:
    """Mixin: ``repr`` and ``_repr_html_`` from :meth:`headline` (and :meth:`display_rows` where a class has
    a per-method table)."""

    def headline(self) -> dict[str, Any]:
        raise NotImplementedError

    def display_rows(self) -> dict[str, dict[str, Any]] | None:
        return None

    def __repr__(self) -> str:
        return short_repr(type(self).__name__, self.headline())

    def _repr_html_(self) -> str:
        return html_card(type(self).__name__, self.headline(), self.display_rows())
