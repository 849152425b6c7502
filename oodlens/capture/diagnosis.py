"""The result of a capture: :class:`Diagnosis`, its tables, its headline summary, and its folder."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..display import Displayed
from ..errors import OodlensError, first_line
from ..stats import Estimate
from ..storage import json_ready, recover, write_folder

FORMAT_VERSION = 1
HEADLINE_NUMBERS = (
    "max_logit_within",
    "max_logit_beyond",
    "entropy_late_within",
    "entropy_beyond",
    "sink_mass_beyond",
)
# the factors that summaries, comparisons and collected tables carry with their n (beyond L, within for scale)
FACTOR_NUMBERS = (
    "max_logit_within",
    "max_logit_beyond",
    "entropy_late_within",
    "entropy_beyond",
    "sink_mass_within",
    "sink_mass_beyond",
)
HEADER_FILE = "diagnosis.json"
SAMPLES_FILE = "hidden_samples.npz"

TABLE_KINDS = (
    "logits_by_distance",
    "max_logit_by_position",
    "entropy_by_position",
    "hidden_by_position",
    "hidden_first_positions",
    "position_probe",
)


# Every binned table of one head: the bin [bin_start, bin_end) and the moments of its values.
BINNED_HEAD_COLUMNS = ("layer", "head", "bin_start", "bin_end", "count", "mean", "std", "min", "max")
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "logits_by_distance": (*BINNED_HEAD_COLUMNS, "last_query_max", "running_max"),
    "max_logit_by_position": (
        "layer",
        "head",
        "position",
        "max_logit",
        "min_logit",
        "n_keys",
        "entropy",
        "entropy_min",
    ),
    "entropy_by_position": (*BINNED_HEAD_COLUMNS, "sink_mass"),
    "hidden_by_position": ("layer", "bin_start", "bin_end", "count", "norm", "cosine_to_later"),
    "hidden_first_positions": ("layer", "position", "norm", "cosine_to_later"),
    "position_probe": ("layer", "target", "metric", "score", "n_samples", "n_folds"),
}


def empty_table(kind: str) -> pd.DataFrame:
    return pd.DataFrame({column: [] for column in TABLE_COLUMNS[kind]})


@dataclass(repr=False)
class Diagnosis(Displayed):
    """The three OOD factors of one model, policy and set of windows.

    Attributes:
        meta: model, train_length, length, n_windows, policy, dtype, device, capture settings, versions.
        tables: one DataFrame per kind in :data:`TABLE_KINDS` (see the accessor of the same name).
        samples: per hidden layer, positions ``[S]`` and float32 hidden vectors ``[S, d]``.
    """

    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    samples: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def headline(self) -> dict[str, Any]:
        meta, numbers = self.meta, self.summary()
        return {
            "model": meta.get("model"),
            "policy": meta.get("policy", {}).get("name"),
            "windows": f"{meta.get('n_windows')} × {meta.get('length')} tokens",
            "train_length": meta.get("train_length"),
            **{key: numbers.get(key) for key in HEADLINE_NUMBERS},
        }

    @property
    def train_length(self) -> int:
        return int(self.meta["train_length"])

    def logits_by_distance(self) -> pd.DataFrame:
        """Factor 1: ``[layer, head, bin_start, bin_end, count, mean, std, min, max, last_query_max,
        running_max]``; distance bins ``[bin_start, bin_end)`` over the sampled queries (empty bins dropped);
        ``running_max`` is the last query's maximum over all distances ``< bin_end`` (the paper's Fig. 1a)."""
        return self.tables["logits_by_distance"].copy()

    def max_logit_by_position(self) -> pd.DataFrame:
        """Factor 1 per sampled query: ``[layer, head, position, max_logit, min_logit, n_keys, entropy,
        entropy_min]`` (``n_keys``: keys attended; ``entropy``: mean, ``entropy_min``: min over windows)."""
        return self.tables["max_logit_by_position"].copy()

    def entropy_by_position(self) -> pd.DataFrame:
        """Factor 2: ``[layer, head, bin_start, bin_end, count, mean, std, min, max, sink_mass]`` over every
        query in position bins ``[bin_start, bin_end)``; ``sink_mass`` is the mean attention on the first
        ``n_global`` keys."""
        return self.tables["entropy_by_position"].copy()

    def hidden_by_position(self) -> pd.DataFrame:
        """Factor 3: ``[layer, bin_start, bin_end, count, norm, cosine_to_later]``, means per position bin."""
        return self.tables["hidden_by_position"].copy()

    def hidden_first_positions(self) -> pd.DataFrame:
        """Factor 3, unbinned for the first positions: ``[layer, position, norm, cosine_to_later]``."""
        return self.tables["hidden_first_positions"].copy()

    def position_probe(self) -> pd.DataFrame:
        """Factor 3: out-of-fold probe scores ``[layer, target, metric, score, n_samples, n_folds]``."""
        return self.tables["position_probe"].copy()

    def hidden_samples(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``[S]`` and float32 hidden vectors ``[S, d]`` sampled from decoder layer ``layer``."""
        if layer not in self.samples:
            raise OodlensError(
                f"no hidden states captured for layer {layer}; captured: {sorted(self.samples)}"
            )
        positions, vectors = self.samples[layer]
        return positions.copy(), vectors.copy()

    def to_dataframe(self, kind: str) -> pd.DataFrame:
        """The table called ``kind`` (one of :data:`TABLE_KINDS`)."""
        if kind not in TABLE_KINDS:
            raise OodlensError(f"unknown table {kind!r}; choose from {', '.join(TABLE_KINDS)}")
        return getattr(self, kind)()

    def summary(self) -> dict[str, float]:
        """Headline numbers inside (``_within``: distance or position ``< train_length``) and beyond it.

        ``max_logit_*``: largest logit over layers and heads; ``head_max_logit_*``: per-head maximum, mean
        over layers and heads; ``last_query_max_*``: the last query's maximum, mean over layers and heads (the
        paper's Fig. 1a); ``entropy_*`` and ``sink_mass_*``: query-weighted means over layers and heads, with
        ``entropy_late_within`` for positions in ``[train_length/2, train_length)``; then probe scores per
        layer.
        Bins straddling a boundary are left out; NaN where nothing was captured in a range.
        """
        length = self.train_length
        logits = self.tables["logits_by_distance"]
        entropy = self.tables["entropy_by_position"]
        within_d, beyond_d = logits["bin_end"] <= length, logits["bin_start"] >= length
        result: dict[str, float] = {}
        for label, rows in (("within", logits[within_d]), ("beyond", logits[beyond_d])):
            per_head = rows.groupby(["layer", "head"])
            result[f"max_logit_{label}"] = _nan_if_empty(rows["max"].max())
            result[f"head_max_logit_{label}"] = _nan_if_empty(per_head["max"].max().mean())
            result[f"last_query_max_{label}"] = _nan_if_empty(per_head["last_query_max"].max().mean())
        ranges = {
            "within": entropy["bin_end"] <= length,
            "late_within": (entropy["bin_start"] >= length // 2) & (entropy["bin_end"] <= length),
            "beyond": entropy["bin_start"] >= length,
        }
        for label, selected in ranges.items():
            rows = entropy[selected]
            result[f"entropy_{label}"] = _weighted_mean(rows["mean"], rows["count"])
            result[f"sink_mass_{label}"] = _weighted_mean(rows["sink_mass"], rows["count"])
        for row in self.tables["position_probe"].itertuples():
            result[f"probe_layer{row.layer}_{row.target}_{row.metric}"] = float(row.score)
        return result

    def estimates(self) -> dict[str, Estimate]:
        """The :data:`FACTOR_NUMBERS` of :meth:`summary` with their n (:func:`factor_estimates`)."""
        return factor_estimates(self.summary(), int(self.meta["n_windows"]))

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write a folder: one Parquet file per table, ``hidden_samples.npz``, ``diagnosis.json``.

        Written to a staging folder beside ``path`` and swapped into place
        (:func:`oodlens.storage.write_folder`), so a reader never sees a half-written diagnosis. An earlier
        diagnosis at ``path`` is replaced (unless ``overwrite=False``); a file, or a folder oodlens did not
        write, is never replaced.
        """

        def fill(staging: Path) -> None:
            for kind, table in self.tables.items():
                table.to_parquet(staging / f"{kind}.parquet", index=False)
            arrays = {}
            for layer, (positions, vectors) in self.samples.items():
                arrays[f"positions_{layer}"], arrays[f"vectors_{layer}"] = positions, vectors
            np.savez_compressed(staging / SAMPLES_FILE, **arrays)
            header = {
                "format": FORMAT_VERSION,
                "meta": self.meta,
                "tables": list(self.tables),
                "hidden_layers": sorted(self.samples),
            }
            (staging / HEADER_FILE).write_text(json.dumps(json_ready(header), indent=2))

        return write_folder(Path(path), fill, kind="diagnosis", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Diagnosis:
        """Read a folder written by :meth:`save`; a damaged or incomplete one is an error naming its file."""
        folder = Path(path)
        recover(folder)  # a save cut short by a killed process is finished or undone first
        header_file = folder / HEADER_FILE
        if not header_file.is_file():
            raise OodlensError(f"{str(folder)!r} is not a saved diagnosis (no {HEADER_FILE})")
        damaged = f"{str(folder)!r} is a damaged diagnosis"
        try:
            header = json.loads(header_file.read_text())
            version, kinds, layers, meta = (
                header["format"],
                header["tables"],
                header["hidden_layers"],
                header["meta"],
            )
        except (ValueError, KeyError, TypeError) as error:
            raise OodlensError(
                f"{damaged}: {HEADER_FILE} is unreadable ({first_line(error)}); save it again"
            ) from error
        if version != FORMAT_VERSION:
            raise OodlensError(f"{str(folder)!r} has diagnosis format {version}, expected {FORMAT_VERSION}")
        if sorted(kinds) != sorted(TABLE_KINDS) or "train_length" not in meta:
            raise OodlensError(f"{damaged}: {HEADER_FILE} lists tables {kinds}, expected {list(TABLE_KINDS)}")
        tables = {}
        for kind in kinds:
            try:
                tables[kind] = pd.read_parquet(folder / f"{kind}.parquet")
            except Exception as error:  # pyarrow raises its own types for truncated files
                raise OodlensError(
                    f"{damaged}: {kind}.parquet is unreadable ({first_line(error)})"
                ) from error
            missing = [column for column in TABLE_COLUMNS[kind] if column not in tables[kind]]
            if missing:
                raise OodlensError(f"{damaged}: {kind}.parquet lacks column {missing[0]!r}")
        try:
            with np.load(folder / SAMPLES_FILE) as arrays:
                samples = {
                    layer: (arrays[f"positions_{layer}"], arrays[f"vectors_{layer}"]) for layer in layers
                }
        except Exception as error:  # zip, pickle and key errors of a damaged .npz
            raise OodlensError(f"{damaged}: {SAMPLES_FILE} is unreadable ({first_line(error)})") from error
        return cls(meta, tables, samples)


def factor_estimates(numbers: dict[str, Any], n_windows: int) -> dict[str, Estimate]:
    """The :data:`FACTOR_NUMBERS` among ``numbers`` (a :meth:`Diagnosis.summary`) as estimates of one capture
    pooled over ``n_windows`` windows: maxima and query-weighted means over all their queries, so n counts the
    windows and no interval is given (method ``pooled-windows``)."""
    return {
        key: Estimate(_nan_if_empty(numbers[key]), math.nan, math.nan, n_windows, "pooled-windows")
        for key in FACTOR_NUMBERS
        if key in numbers
    }


def _nan_if_empty(value: Any) -> float:
    return float(value) if value is not None and not pd.isna(value) else math.nan


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total > 0 else math.nan
