"""Factors 1 and 2: the attention engine's observer.

For every layer and block of queries the engine hands :class:`LogitObserver` a
:class:`~oodlens.BlockStats`; the observer reduces it at once to small float32/float64 arrays
``[heads, bins]``:

- Factor 1 (unseen distances): the logits of the *sampled* queries binned by true distance (count, mean, std,
  min, max), the last query's maximum per distance bin (the paper's Fig. 1a takes its running maximum), and
  each sampled query's maximum logit.
- Factor 2 (unseen number of tokens): the entropy of *every* query and the probability mass on the first
  ``n_global`` keys, binned by query position.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from ..attention import BlockStats
from ..errors import OodlensError, non_finite_note
from .config import CaptureConfig, CaptureGeometry
from .diagnosis import empty_table
from .stats import BinnedMoments, heads_first


class LayerLogitStats:
    """The running statistics of one attention layer (see :class:`LogitObserver`)."""

    def __init__(self, heads: int, geometry: CaptureGeometry, device: torch.device):
        n_distance = len(geometry.distance_edges) - 1
        n_position = len(geometry.position_edges) - 1
        n_sampled = len(geometry.sampled_positions)
        self.by_distance = BinnedMoments(heads, n_distance, device)
        self.last_query_max = torch.full((heads, n_distance), -math.inf, device=device)
        self.entropy = BinnedMoments(heads, n_position, device)
        self.sink_mass = BinnedMoments(heads, n_position, device)
        self.query_max = torch.full((heads, n_sampled), -math.inf, device=device)
        self.query_min = torch.full((heads, n_sampled), math.inf, device=device)
        self.query_keys = torch.zeros(heads, n_sampled, device=device)
        self.query_entropy_sum = torch.zeros(heads, n_sampled, dtype=torch.float64, device=device)
        self.query_entropy_min = torch.full((heads, n_sampled), math.inf, device=device)
        self.query_rows = torch.zeros(n_sampled, dtype=torch.float64, device=device)


class LogitObserver:
    """Reduces the engine's per-block statistics to Factor 1 and Factor 2 arrays (implements
    :class:`oodlens.attention.AttentionObserver`).

    Statistics over several windows (or batch rows) are pooled: counts, means and stds over all of them,
    maxima as the maximum and minima as the minimum over them.
    """

    def __init__(self, config: CaptureConfig):
        self.config = config
        self.n_global = config.n_global
        self.geometry: CaptureGeometry | None = None
        self.layers: dict[int, LayerLogitStats] = {}
        self.non_finite: dict[str, str] = {}  # place → warning, for the diagnosis' meta
        self._device_tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, geometry: CaptureGeometry) -> None:
        """Fix the bins (called before the first forward)."""
        self.geometry = geometry

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distance edges, position edges and sampled positions on ``device`` (made once per device)."""
        if device not in self._device_tensors:
            g = self.geometry
            self._device_tensors[device] = tuple(
                torch.as_tensor(a, device=device)
                for a in (g.distance_edges, g.position_edges, g.sampled_positions)
            )
        return self._device_tensors[device]

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices of the sampled queries among ``positions [C]``: every ``query_stride``-th and the last."""
        g = self.geometry
        keep = (positions % g.query_stride == 0) | (positions == g.length - 1)
        return keep.nonzero().squeeze(-1)

    def observe(self, layer_idx: int, stats: BlockStats) -> None:
        """Fold one block of queries into the layer's arrays (keeps no reference to ``stats``)."""
        if self.geometry is None:
            raise OodlensError(
                "LogitObserver got attention statistics before begin(): use capture() or diagnose()"
            )
        device = stats.entropy.device
        if layer_idx not in self.layers:
            self.layers[layer_idx] = LayerLogitStats(stats.entropy.shape[1], self.geometry, device)
        where = f"the attention of layer {layer_idx}"
        if where not in self.non_finite and not bool(torch.isfinite(stats.entropy).all()):
            self.non_finite[where] = non_finite_note(where, stats.dtype)
            warnings.warn(f"oodlens: {self.non_finite[where]}", stacklevel=2)
        layer = self.layers[layer_idx]
        distance_edges, position_edges, sampled_positions = self._tensors(device)
        self._add_queries(layer, stats, position_edges)
        if stats.sampled_logits is not None and stats.sampled_positions.numel():
            self._add_sampled_rows(layer, stats, distance_edges, sampled_positions)

    def _add_queries(self, layer: LayerLogitStats, stats: BlockStats, position_edges: torch.Tensor) -> None:
        """Factor 2: entropy and sink mass of every query, by position bin."""
        batch = stats.entropy.shape[0]
        bins = (torch.bucketize(stats.query_positions, position_edges, right=True) - 1).repeat(batch)
        layer.entropy.add(heads_first(stats.entropy.float()), bins)
        if stats.sink_mass is not None:
            layer.sink_mass.add(heads_first(stats.sink_mass.float()), bins)

    def _add_sampled_rows(
        self,
        layer: LayerLogitStats,
        stats: BlockStats,
        distance_edges: torch.Tensor,
        sampled_positions: torch.Tensor,
    ) -> None:
        """Factor 1: the sampled rows' logits by true distance, per-query extremes, the last query's curve."""
        logits = stats.sampled_logits.float()  # [B, H, R, K], -inf where not attended
        distances = stats.sampled_distances  # [R, K]
        batch, heads = logits.shape[:2]
        # The engine masks by position only, so one mask serves every batch row and head. Gathering the
        # attended entries first skips the masked half of each row (future keys) in all reductions below.
        attended = torch.isfinite(logits[0, 0]) & (distances >= 0)
        rows, keys = attended.nonzero(as_tuple=True)  # [M] each
        values = heads_first(logits[:, :, rows, keys])  # [H, B·M]
        bins = torch.bucketize(distances[rows, keys], distance_edges, right=True) - 1
        layer.by_distance.add(values, bins.repeat(batch))

        # dense reductions over each row (masked entries are -inf), not a scatter into R targets
        row_max = torch.where(attended, logits, -math.inf).amax(dim=(0, -1))  # [H, R]
        row_min = torch.where(attended, logits, math.inf).amin(dim=(0, -1))
        slots = torch.searchsorted(sampled_positions, stats.sampled_positions)  # unique within a block
        block_rows = torch.searchsorted(stats.query_positions, stats.sampled_positions)
        entropy = stats.entropy[:, :, block_rows].float()  # [B, H, R]
        layer.query_max[:, slots] = torch.maximum(layer.query_max[:, slots], row_max)
        layer.query_min[:, slots] = torch.minimum(layer.query_min[:, slots], row_min)
        layer.query_keys[:, slots] = attended.sum(-1).float()
        layer.query_entropy_sum[:, slots] += entropy.double().sum(0)
        layer.query_entropy_min[:, slots] = torch.minimum(layer.query_entropy_min[:, slots], entropy.amin(0))
        layer.query_rows[slots] += batch

        last = (stats.sampled_positions == self.geometry.length - 1).nonzero().squeeze(-1)
        if last.numel():
            in_last_row = (rows == last[0]).repeat(batch)
            index = bins.repeat(batch)[in_last_row].expand(heads, -1)
            layer.last_query_max.scatter_reduce_(1, index, values[:, in_last_row], "amax")

    def tables(self) -> dict[str, pd.DataFrame]:
        """``logits_by_distance``, ``max_logit_by_position`` and ``entropy_by_position`` tables."""
        names = ("logits_by_distance", "max_logit_by_position", "entropy_by_position")
        if self.geometry is None or not self.layers:
            return {name: empty_table(name) for name in names}
        parts = {name: [] for name in names}
        for layer_idx in sorted(self.layers):
            layer = self.layers[layer_idx]
            parts["logits_by_distance"].append(self._distance_table(layer_idx, layer))
            parts["max_logit_by_position"].append(self._sampled_table(layer_idx, layer))
            parts["entropy_by_position"].append(self._entropy_table(layer_idx, layer))
        return {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}

    def _distance_table(self, layer_idx: int, layer: LayerLogitStats) -> pd.DataFrame:
        columns = layer.by_distance.columns()
        last_max = layer.last_query_max.cpu().double().numpy()
        # The paper's curve: the largest logit the last query has at any distance up to the bin's end.
        running = np.maximum.accumulate(last_max, axis=1)
        last_max = np.where(np.isfinite(last_max), last_max, np.nan)
        running = np.where(np.isfinite(running), running, np.nan)
        frame = _binned_frame(layer_idx, self.geometry.distance_edges, columns)
        frame["last_query_max"] = last_max.ravel()
        frame["running_max"] = running.ravel()
        return frame[frame["count"] > 0].reset_index(drop=True)

    def _sampled_table(self, layer_idx: int, layer: LayerLogitStats) -> pd.DataFrame:
        heads, n_sampled = layer.query_max.shape
        rows = layer.query_rows.cpu().numpy()
        seen = np.tile(rows > 0, heads)
        with np.errstate(invalid="ignore", divide="ignore"):
            entropy_mean = layer.query_entropy_sum.cpu().numpy() / rows
        frame = pd.DataFrame(
            {
                "layer": layer_idx,
                "head": np.repeat(np.arange(heads), n_sampled),
                "position": np.tile(self.geometry.sampled_positions, heads),
                "max_logit": layer.query_max.cpu().double().numpy().ravel(),
                "min_logit": layer.query_min.cpu().double().numpy().ravel(),
                "n_keys": layer.query_keys.cpu().numpy().astype(np.int64).ravel(),
                "entropy": entropy_mean.ravel(),
                "entropy_min": layer.query_entropy_min.cpu().double().numpy().ravel(),
            }
        )
        return frame[seen].reset_index(drop=True)

    def _entropy_table(self, layer_idx: int, layer: LayerLogitStats) -> pd.DataFrame:
        frame = _binned_frame(layer_idx, self.geometry.position_edges, layer.entropy.columns())
        frame["sink_mass"] = layer.sink_mass.columns()["mean"].ravel()
        return frame[frame["count"] > 0].reset_index(drop=True)


def _binned_frame(layer_idx: int, edges: np.ndarray, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows ``(layer, head, bin_start, bin_end, *columns)`` from ``[H, bins]`` arrays."""
    heads, bins = columns["count"].shape
    frame = pd.DataFrame(
        {
            "layer": layer_idx,
            "head": np.repeat(np.arange(heads), bins),
            "bin_start": np.tile(edges[:-1], heads),
            "bin_end": np.tile(edges[1:], heads),
        }
    )
    for name, values in columns.items():
        frame[name] = values.ravel()
    frame["count"] = frame["count"].astype(np.int64)
    return frame
