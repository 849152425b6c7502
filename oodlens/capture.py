"""Diagnose the three out-of-distribution factors of LM-Infinite in one forward pass.

Two observers ride along a normal forward:

* :class:`LogitObserver` is the attention engine's observer (:class:`oodlens.attention.AttentionObserver`).
  For every layer and block of queries the engine hands it a :class:`~oodlens.attention.BlockStats`; the
  observer reduces it at once to small float32/float64 arrays ``[heads, bins]``:

  - Factor 1 (unseen distances): the logits of the *sampled* queries binned by true distance (count, mean,
    std, min, max), the last query's maximum per distance bin (the paper's Fig. 1a takes its running
    maximum), and each sampled query's maximum logit.
  - Factor 2 (unseen number of tokens): the entropy of *every* query and the probability mass on the first
    ``sink_tokens`` keys, binned by query position.

* :class:`HiddenStateObserver` hooks chosen decoder layers (Factor 3, starting tokens): hidden-state norm
  and cosine to the mean of later positions by position bin, and a sample of hidden vectors for PCA and a
  position probe (scikit-learn).

Logits-by-distance statistics are exact for the sampled queries (every ``query_stride``-th query plus the
last); ``query_stride=1`` samples all of them. Nothing of size n×n is ever formed: the engine works in
blocks, and only the sampled rows (``R × n``) are written out.

Entry points: :func:`diagnose` (one call, returns a :class:`Diagnosis`) and :func:`capture` (a context
manager around forwards you run yourself). Both restore the model's attention implementation and remove
their hooks on exit, also on error, and leave the model's outputs unchanged.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import attention
from .errors import OodlensError
from .policies import Policy, PolicyHandle, apply_policy, attention_modules, vanilla

DEFAULT_HIDDEN_LAYERS = (1, 2, 5, 10, -1)  # -1: the last layer; the paper's appendix shows 1, 2, 3, 5, 10, 20
UNIT_DISTANCE_BINS = 64  # distances 0..63 get a bin each: the closest keys matter most
LOG_BINS_PER_OCTAVE = 8
FORMAT_VERSION = 1
HEADER_FILE = "diagnosis.json"
SAMPLES_FILE = "hidden_samples.npz"
MAX_PROBE_FOLDS = 5
RIDGE_ALPHAS = np.logspace(-2, 4, 13)

TABLE_KINDS = (
    "logits_by_distance",
    "max_logit_by_position",
    "entropy_by_position",
    "hidden_by_position",
    "hidden_first_positions",
    "position_probe",
)


# --------------------------------------------------------------------------------------------------------
# Configuration and the resolved geometry of one capture
# --------------------------------------------------------------------------------------------------------


@dataclass
class CaptureConfig:
    """What to capture and how finely.

    Attributes:
        layers: attention layers to observe (0-based ``layer_idx``); ``None`` = all.
        hidden_layers: decoder layers whose *output* hidden states are reduced (layer ``l`` is transformers'
            ``hidden_states[l + 1]``); ``None`` = 1, 2, 5, 10 and the last, where the model has them.
        distance_edges: increasing bin edges for distances, ``[e0 = 0, …, e_last ≥ length]``, bin ``k`` being
            ``[e_k, e_{k+1})``; ``None`` = width-1 bins for 0..63, then 8 log-spaced bins per octave up to the
            length, with edges at the pretraining length and half of it.
        position_edges: the same for query positions; ``None`` = ``n_position_bins`` equal-width bins plus
            edges at the pretraining length and half of it.
        n_position_bins: number of equal-width position bins when ``position_edges`` is ``None``.
        sink_tokens: the sink mass is the attention on keys at positions ``< sink_tokens``.
        query_stride: the full logit rows of every ``query_stride``-th query (and always the last one) are
            captured; ``None`` = ``ceil(length / sampled_queries)``; 1 = every query (costs ``Q × n`` memory
            per block).
        sampled_queries: about how many queries to sample when ``query_stride`` is ``None``.
        hidden_head_positions: the hidden-state sample holds every one of the first positions…
        hidden_stratified_positions: …and one random position from each of this many equal strata after them.
        first_positions: hidden-state norm and cosine are also kept unbinned for these first positions.
        start_tokens: the probe's classification target is "position < start_tokens".
        seed: seeds the hidden-state sample and the probe's train/test split.
        block_size: queries per engine block (``None``: the engine's default, 512 when observed). Larger
            blocks make fewer, larger kernel calls (measured on 2 CPU cores at 4,096 tokens: one block costs
            16% less than blocks of 512, and far less when the cores are shared); memory per block grows as
            ``block × (heads × head_dim + n_keys × heads / query_stride)`` floats, so keep it moderate with
            ``query_stride=1`` at long lengths.
    """

    layers: Sequence[int] | None = None
    hidden_layers: Sequence[int] | None = None
    distance_edges: Sequence[int] | None = None
    position_edges: Sequence[int] | None = None
    n_position_bins: int = 64
    sink_tokens: int = 4
    query_stride: int | None = None
    sampled_queries: int = 256
    hidden_head_positions: int = 256
    hidden_stratified_positions: int = 768
    first_positions: int = 64
    start_tokens: int = 4
    seed: int = 0
    block_size: int | None = 2048


@dataclass(frozen=True)
class CaptureGeometry:
    """The bins and samples of one capture, fixed by the first forward's length.

    Attributes:
        length: tokens per window (queries at positions ``0 … length - 1``).
        train_length: the model's pretraining length.
        distance_edges: ``[n_distance_bins + 1]`` int64 edges.
        position_edges: ``[n_position_bins + 1]`` int64 edges.
        query_stride: every ``query_stride``-th query (and the last) is sampled.
        sampled_positions: ``[S]`` sorted positions of the sampled queries.
    """

    length: int
    train_length: int
    distance_edges: np.ndarray
    position_edges: np.ndarray
    query_stride: int
    sampled_positions: np.ndarray


def default_distance_edges(length: int, train_length: int) -> np.ndarray:
    """Width-1 edges for 0..63, then 8 log-spaced per octave to ``length``, plus ``train_length`` and half."""
    unit = np.arange(min(UNIT_DISTANCE_BINS, length) + 1)
    octaves = max(math.log2(length / UNIT_DISTANCE_BINS), 0.0)
    n_log = max(int(math.ceil(octaves * LOG_BINS_PER_OCTAVE)), 1)
    log_spaced = np.geomspace(UNIT_DISTANCE_BINS, length, n_log + 1).round().astype(np.int64)
    return _merged_edges([unit, log_spaced], length, train_length)


def default_position_edges(length: int, train_length: int, n_bins: int) -> np.ndarray:
    """``n_bins`` equal-width edges over ``[0, length]`` plus ``train_length`` and half of it."""
    equal = np.linspace(0, length, n_bins + 1).round().astype(np.int64)
    return _merged_edges([equal], length, train_length)


def _merged_edges(parts: list[np.ndarray], length: int, train_length: int) -> np.ndarray:
    # The edges at L/2 and L make "inside vs beyond the pretraining length" exact without straddling bins.
    landmarks = np.array([0, train_length // 2, train_length, length])
    edges = np.unique(np.concatenate([*parts, landmarks]).astype(np.int64))
    return edges[edges <= length]


def _checked_edges(edges: Sequence[int], length: int, label: str) -> np.ndarray:
    array = np.asarray(edges, dtype=np.int64)
    if array.ndim != 1 or array.size < 2 or np.any(np.diff(array) <= 0):
        raise OodlensError(f"{label} must be at least two strictly increasing integers, got {list(edges)}")
    if array[0] != 0 or array[-1] < length:
        raise OodlensError(
            f"{label} must start at 0 and end at or after the length ({length}) so that every value has a "
            "bin; "
            f"got [{array[0]}, …, {array[-1]}]"
        )
    return array


def resolve_geometry(config: CaptureConfig, length: int, train_length: int) -> CaptureGeometry:
    """Bins and sampled queries for windows of ``length`` tokens."""
    if config.distance_edges is None:
        distance_edges = default_distance_edges(length, train_length)
    else:
        distance_edges = _checked_edges(config.distance_edges, length, "distance_edges")
    if config.position_edges is None:
        position_edges = default_position_edges(length, train_length, config.n_position_bins)
    else:
        position_edges = _checked_edges(config.position_edges, length, "position_edges")
    stride = config.query_stride or max(1, math.ceil(length / config.sampled_queries))
    if stride < 1:
        raise OodlensError(f"query_stride must be ≥ 1, got {stride}")
    sampled = np.union1d(np.arange(0, length, stride), [length - 1]).astype(np.int64)
    return CaptureGeometry(length, train_length, distance_edges, position_edges, stride, sampled)


# --------------------------------------------------------------------------------------------------------
# Factors 1 and 2: the attention observer
# --------------------------------------------------------------------------------------------------------


class BinnedMoments:
    """Count, sum, sum of squares (float64), min and max (float32) of values per head and bin.

    Arrays are ``[heads, bins]`` on the device of the observed tensors.
    """

    def __init__(self, heads: int, bins: int, device: torch.device):
        self.count = torch.zeros(heads, bins, dtype=torch.float64, device=device)
        self.total = torch.zeros_like(self.count)
        self.total_sq = torch.zeros_like(self.count)
        self.max = torch.full((heads, bins), -math.inf, device=device)
        self.min = torch.full((heads, bins), math.inf, device=device)

    def add(self, values: torch.Tensor, bins: torch.Tensor) -> None:
        """Add float32 ``values [H, N]`` (all finite) into ``bins [N]`` (the same bins for every head)."""
        self.count += torch.bincount(bins, minlength=self.count.shape[1])
        index = bins.expand_as(values)
        wide = values.double()
        self.total.scatter_add_(1, index, wide)
        self.total_sq.scatter_add_(1, index, wide * wide)
        self.max.scatter_reduce_(1, index, values, "amax")
        self.min.scatter_reduce_(1, index, values, "amin")

    def columns(self) -> dict[str, np.ndarray]:
        """``count, mean, std, min, max`` as ``[H, bins]`` float64 arrays (NaN where a bin is empty)."""
        count = self.count.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total.cpu().numpy() / count
            variance = self.total_sq.cpu().numpy() / count - mean**2
        empty = count == 0
        return {
            "count": count,
            "mean": mean,
            "std": np.sqrt(np.maximum(variance, 0.0)),
            "min": np.where(empty, np.nan, self.min.cpu().double().numpy()),
            "max": np.where(empty, np.nan, self.max.cpu().double().numpy()),
        }


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, ...]`` → ``[H, B·…]`` (a view when B = 1)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


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
        self.sink_tokens = config.sink_tokens
        self.geometry: CaptureGeometry | None = None
        self.layers: dict[int, LayerLogitStats] = {}
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

    def observe(self, layer_idx: int, stats: attention.BlockStats) -> None:
        """Fold one block of queries into the layer's arrays (keeps no reference to ``stats``)."""
        if self.geometry is None:
            raise OodlensError(
                "LogitObserver got attention statistics before begin(): use capture() or diagnose()"
            )
        device = stats.entropy.device
        if layer_idx not in self.layers:
            self.layers[layer_idx] = LayerLogitStats(stats.entropy.shape[1], self.geometry, device)
        layer = self.layers[layer_idx]
        distance_edges, position_edges, sampled_positions = self._tensors(device)
        self._add_queries(layer, stats, position_edges)
        if stats.sampled_logits is not None and stats.sampled_positions.numel():
            self._add_sampled_rows(layer, stats, distance_edges, sampled_positions)

    def _add_queries(
        self, layer: LayerLogitStats, stats: attention.BlockStats, position_edges: torch.Tensor
    ) -> None:
        """Factor 2: entropy and sink mass of every query, by position bin."""
        batch = stats.entropy.shape[0]
        bins = (torch.bucketize(stats.query_positions, position_edges, right=True) - 1).repeat(batch)
        layer.entropy.add(_heads_first(stats.entropy.float()), bins)
        if stats.sink_mass is not None:
            layer.sink_mass.add(_heads_first(stats.sink_mass.float()), bins)

    def _add_sampled_rows(
        self,
        layer: LayerLogitStats,
        stats: attention.BlockStats,
        distance_edges: torch.Tensor,
        sampled_positions: torch.Tensor,
    ) -> None:
        """Factor 1: the sampled rows' logits by true distance, per-query extremes, the last query's curve."""
        logits = stats.sampled_logits.float()  # [B, H, R, K], -inf where not attended
        distances = stats.sampled_distances  # [R, K]
        batch, heads, n_rows = logits.shape[:3]
        # The engine masks by position only, so one mask serves every batch row and head. Gathering the
        # attended entries first skips the masked half of each row (future keys) in all reductions below.
        attended = torch.isfinite(logits[0, 0]) & (distances >= 0)
        rows, keys = attended.nonzero(as_tuple=True)  # [M] each
        values = _heads_first(logits[:, :, rows, keys])  # [H, B·M]
        bins = torch.bucketize(distances[rows, keys], distance_edges, right=True) - 1
        layer.by_distance.add(values, bins.repeat(batch))

        row_index = rows.repeat(batch).expand_as(values)
        row_max = logits.new_full((heads, n_rows), -math.inf).scatter_reduce_(1, row_index, values, "amax")
        row_min = logits.new_full((heads, n_rows), math.inf).scatter_reduce_(1, row_index, values, "amin")
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
            return {name: _empty_table(name) for name in names}
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


# --------------------------------------------------------------------------------------------------------
# Factor 3: hidden states of chosen decoder layers
# --------------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order: the elements of the ``ModuleList`` that holds the attention modules."""
    attention_by_layer = attention_modules(model)
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < len(attention_by_layer):
            continue
        owner = {id(inner): layer for layer in module for inner in layer.modules()}
        if all(id(attn) in owner for attn in attention_by_layer):
            return [owner[id(attn)] for attn in attention_by_layer]
    raise OodlensError(
        f"found no list of decoder layers holding the attention modules of {type(model).__name__}"
    )


def resolve_hidden_layers(requested: Sequence[int] | None, n_layers: int) -> list[int]:
    """Requested layers (negative = from the end), or the defaults clipped to the model; sorted, unique."""
    if requested is None:
        return sorted({layer % n_layers for layer in DEFAULT_HIDDEN_LAYERS if layer < n_layers})
    if any(not -n_layers <= layer < n_layers for layer in requested):
        raise OodlensError(f"hidden_layers {list(requested)} must lie in -{n_layers}..{n_layers - 1}")
    return sorted({layer % n_layers for layer in requested})


def hidden_sample_positions(length: int, config: CaptureConfig, window: int) -> np.ndarray:
    """Positions ``[S]`` whose hidden vectors are kept for window number ``window``.

    All of the first ``hidden_head_positions``, then one uniformly random position in each of
    ``hidden_stratified_positions`` equal strata of the rest (seeded by ``seed`` and ``window``, so windows
    cover different positions).
    """
    head = np.arange(min(config.hidden_head_positions, length))
    rest_start, n_strata = len(head), config.hidden_stratified_positions
    if length - rest_start <= n_strata:
        return np.arange(length)
    edges = np.linspace(rest_start, length, n_strata + 1)
    rng = np.random.default_rng([config.seed, window])
    picks = np.floor(edges[:-1] + rng.random(n_strata) * np.diff(edges)).astype(np.int64)
    return np.concatenate([head, np.minimum(picks, length - 1)])


class LayerHiddenStats:
    """Running sums of one decoder layer's hidden-state statistics (float64) and its vector sample."""

    def __init__(self, geometry: CaptureGeometry, n_first: int, device: torch.device):
        n_bins = len(geometry.position_edges) - 1
        self.norm_sum = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.norm_count = torch.zeros_like(self.norm_sum)
        self.cosine_sum = torch.zeros_like(self.norm_sum)
        self.cosine_count = torch.zeros_like(self.norm_sum)
        self.first_norm_sum = torch.zeros(n_first, dtype=torch.float64, device=device)
        self.first_cosine_sum = torch.zeros_like(self.first_norm_sum)
        self.first_count = torch.zeros_like(self.first_norm_sum)
        self.sample_positions: list[np.ndarray] = []
        self.sample_vectors: list[np.ndarray] = []


def norm_and_cosine_to_later(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm ``[T]`` of each position and cosine ``[T - 1]`` to the mean of the later positions.

    ``hidden`` is ``[T, d]``. The cosine to a mean equals the cosine to the sum, and the sum after position
    ``i`` is ``total - prefix_i``, so one cumulative sum (float64, to avoid cancellation) costs O(T·d).
    """
    h = hidden.double()
    later = h.cumsum(0).neg_().add_(h.sum(0))  # [T, d]: row i sums positions > i; in place, to save memory
    norm = h.norm(dim=-1)
    cosine = torch.linalg.vecdot(h[:-1], later[:-1]) / (norm[:-1] * later[:-1].norm(dim=-1))
    return norm, cosine


class HiddenStateObserver:
    """Forward hooks on chosen decoder layers that reduce their output hidden states inside the hook."""

    def __init__(self, model: nn.Module, layers: Sequence[int], config: CaptureConfig):
        self.config = config
        self.layer_indices = list(layers)
        self.geometry: CaptureGeometry | None = None
        self.layers: dict[int, LayerHiddenStats] = {}
        self._modules = decoder_layers(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._first_window = 0  # window number of the current forward's first batch row

    def attach(self) -> None:
        for index in self.layer_indices:
            self._handles.append(self._modules[index].register_forward_hook(self._hook(index)))

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def begin(self, geometry: CaptureGeometry) -> None:
        self.geometry = geometry

    def begin_forward(self, first_window: int) -> None:
        """Number the rows of the coming forward from ``first_window`` (each window gets its own sample)."""
        self._first_window = first_window

    def _hook(self, layer_idx: int):
        def reduce_output(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._add(layer_idx, hidden.detach())

        return reduce_output

    def _add(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Fold ``hidden [B, T, d]`` of one layer into its sums and sample (one batch row at a time)."""
        g = self.geometry
        if layer_idx not in self.layers:
            self.layers[layer_idx] = LayerHiddenStats(
                g, min(self.config.first_positions, g.length), hidden.device
            )
        layer = self.layers[layer_idx]
        length = hidden.shape[1]
        edges = torch.as_tensor(g.position_edges, device=hidden.device)
        bins = torch.bucketize(torch.arange(length, device=hidden.device), edges, right=True) - 1
        n_first = layer.first_count.numel()
        for row in range(hidden.shape[0]):
            norm, cosine = norm_and_cosine_to_later(hidden[row].float())
            layer.norm_sum.scatter_add_(0, bins, norm)
            layer.norm_count.scatter_add_(0, bins, torch.ones_like(norm))
            layer.cosine_sum.scatter_add_(0, bins[:-1], cosine)
            layer.cosine_count.scatter_add_(0, bins[:-1], torch.ones_like(cosine))
            layer.first_norm_sum += norm[:n_first]
            layer.first_cosine_sum[: min(n_first, length - 1)] += cosine[:n_first]
            layer.first_count += 1
            positions = hidden_sample_positions(length, self.config, self._first_window + row)
            vectors = hidden[row, torch.as_tensor(positions, device=hidden.device)]
            layer.sample_positions.append(positions)
            layer.sample_vectors.append(vectors.float().cpu().numpy())

    def samples(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per layer: positions ``[S]`` and float32 hidden vectors ``[S, d]`` over all windows."""
        return {
            index: (np.concatenate(layer.sample_positions), np.concatenate(layer.sample_vectors))
            for index, layer in sorted(self.layers.items())
        }

    def tables(self) -> dict[str, pd.DataFrame]:
        """``hidden_by_position`` and ``hidden_first_positions`` tables."""
        if not self.layers:
            return {name: _empty_table(name) for name in ("hidden_by_position", "hidden_first_positions")}
        by_position, first = [], []
        edges = self.geometry.position_edges
        for index, layer in sorted(self.layers.items()):
            count = layer.norm_count.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                frame = pd.DataFrame(
                    {
                        "layer": index,
                        "bin_start": edges[:-1],
                        "bin_end": edges[1:],
                        "count": count.astype(np.int64),
                        "norm": layer.norm_sum.cpu().numpy() / count,
                        "cosine_to_later": layer.cosine_sum.cpu().numpy() / layer.cosine_count.cpu().numpy(),
                    }
                )
            by_position.append(frame[frame["count"] > 0])
            n_first = layer.first_count.numel()
            first_count = layer.first_count.cpu().numpy()
            cosine = layer.first_cosine_sum.cpu().numpy() / first_count
            if n_first == self.geometry.length:  # the last position has no later positions
                cosine[-1] = np.nan
            first.append(
                pd.DataFrame(
                    {
                        "layer": index,
                        "position": np.arange(n_first),
                        "norm": layer.first_norm_sum.cpu().numpy() / first_count,
                        "cosine_to_later": cosine,
                    }
                )
            )
        return {
            "hidden_by_position": pd.concat(by_position, ignore_index=True),
            "hidden_first_positions": pd.concat(first, ignore_index=True),
        }


# --------------------------------------------------------------------------------------------------------
# The position probe (Factor 3): can a linear read-out tell where a token is?
# --------------------------------------------------------------------------------------------------------


def position_probe(
    samples: dict[int, tuple[np.ndarray, np.ndarray]], start_tokens: int, seed: int
) -> pd.DataFrame:
    """Cross-validated scores of linear probes on sampled hidden vectors, per layer.

    Targets: ``log(1 + position)`` (ridge regression, R²) and ``position < start_tokens`` (class-balanced
    logistic regression, balanced accuracy and ROC-AUC). Every score is out-of-fold: each vector is predicted
    by a probe fitted without it. The folds are seeded and stratified on the start-token class, so every
    test fold holds start tokens; this uses all of the few start tokens a short capture has (one window has
    only ``start_tokens`` of them) instead of gambling on one split. Classification scores are NaN where
    fewer than two start (or other) tokens were sampled.

    Returns:
        DataFrame ``[layer, target, metric, score, n_samples, n_folds]``.
    """
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=1):  # small problems; BLAS threads spinning on shared cores cost up to 10×
        for layer, (positions, vectors) in sorted(samples.items()):
            # float64: scikit-learn's ridge solver is several times slower in float32
            rows += _probe_layer(layer, positions, vectors.astype(np.float64), start_tokens, seed)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS["position_probe"]))


def _probe_layer(
    layer: int, positions: np.ndarray, vectors: np.ndarray, start_tokens: int, seed: int
) -> list[tuple]:
    """The rows of :func:`position_probe` for one layer's ``positions [S]`` and ``vectors [S, d]``."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_start = positions < start_tokens
    log_position = np.log1p(positions)
    n_folds = int(min(MAX_PROBE_FOLDS, is_start.sum(), (~is_start).sum()))
    stratified = n_folds >= 2
    if stratified:
        folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(vectors, is_start))
    else:
        n_folds = MAX_PROBE_FOLDS
        folds = list(KFold(n_folds, shuffle=True, random_state=seed).split(vectors))
    regression = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    r2 = r2_score(log_position, cross_val_predict(regression, vectors, log_position, cv=folds))
    balanced, auc = math.nan, math.nan
    if stratified:
        classifier = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)
        )
        decision = cross_val_predict(classifier, vectors, is_start, cv=folds, method="decision_function")
        balanced = balanced_accuracy_score(is_start, decision > 0)
        auc = roc_auc_score(is_start, decision)
    scores = (
        ("log_position", "r2", r2),
        ("start_token", "balanced_accuracy", balanced),
        ("start_token", "roc_auc", auc),
    )
    return [
        (layer, target, metric, float(score), len(positions), n_folds) for target, metric, score in scores
    ]


# --------------------------------------------------------------------------------------------------------
# The result object
# --------------------------------------------------------------------------------------------------------


TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "logits_by_distance": (
        "layer",
        "head",
        "bin_start",
        "bin_end",
        "count",
        "mean",
        "std",
        "min",
        "max",
        "last_query_max",
        "running_max",
    ),
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
    "entropy_by_position": (
        "layer",
        "head",
        "bin_start",
        "bin_end",
        "count",
        "mean",
        "std",
        "min",
        "max",
        "sink_mass",
    ),
    "hidden_by_position": ("layer", "bin_start", "bin_end", "count", "norm", "cosine_to_later"),
    "hidden_first_positions": ("layer", "position", "norm", "cosine_to_later"),
    "position_probe": ("layer", "target", "metric", "score", "n_samples", "n_folds"),
}


def _empty_table(kind: str) -> pd.DataFrame:
    return pd.DataFrame({column: [] for column in TABLE_COLUMNS[kind]})


@dataclass
class Diagnosis:
    """The three OOD factors of one model, policy and set of windows.

    Attributes:
        meta: model, train_length, length, n_windows, policy, dtype, device, capture settings, versions.
        tables: one DataFrame per kind in :data:`TABLE_KINDS` (see the accessor of the same name).
        samples: per hidden layer, positions ``[S]`` and float32 hidden vectors ``[S, d]``.
    """

    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    samples: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

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
        ``sink_tokens`` keys."""
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write a folder: one Parquet file per table, ``hidden_samples.npz``, ``diagnosis.json``.

        Written to a temporary folder beside ``path`` and renamed into place, so a reader never sees a
        half-written diagnosis; an existing folder at ``path`` is replaced.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
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
            _replace_folder(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Diagnosis:
        """Read a folder written by :meth:`save`."""
        folder = Path(path)
        header_file = folder / HEADER_FILE
        if not header_file.is_file():
            raise OodlensError(f"{str(folder)!r} is not a saved diagnosis (no {HEADER_FILE})")
        header = json.loads(header_file.read_text())
        if header.get("format") != FORMAT_VERSION:
            raise OodlensError(
                f"{str(folder)!r} has diagnosis format {header.get('format')}, expected {FORMAT_VERSION}"
            )
        tables = {kind: pd.read_parquet(folder / f"{kind}.parquet") for kind in header["tables"]}
        with np.load(folder / SAMPLES_FILE) as arrays:
            samples = {
                layer: (arrays[f"positions_{layer}"], arrays[f"vectors_{layer}"])
                for layer in header["hidden_layers"]
            }
        return cls(header["meta"], tables, samples)


def _nan_if_empty(value: Any) -> float:
    return float(value) if value is not None and not pd.isna(value) else math.nan


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total > 0 else math.nan


def json_ready(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Running a capture
# --------------------------------------------------------------------------------------------------------


def _sequence_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(batch, length)`` of a decoder layer's input hidden states ``[B, T, d]``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise OodlensError("capture could not read the hidden states entering the first decoder layer")
    return hidden.shape[0], hidden.shape[1]


def runtime_versions() -> dict[str, str]:
    import transformers

    try:
        oodlens_version = importlib.metadata.version("oodlens")
    except importlib.metadata.PackageNotFoundError:
        oodlens_version = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "oodlens": oodlens_version}


class CaptureSession:
    """Routes a model through a policy with both observers attached; see :func:`capture`.

    Every forward between :meth:`open` and :meth:`close` is captured. Windows must all have the length of
    the first forward (the bins are fixed by it), and only prefill forwards are supported (no decoding
    steps against a cache). Left-padded rows are measured at their real positions.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | None = None,
        config: CaptureConfig | None = None,
        train_length: int | None = None,
        name: str | None = None,
    ):
        from .models import model_info

        self.model = model
        self.policy = policy or vanilla()
        self.config = config or CaptureConfig()
        self.train_length = train_length or model_info(model).train_length
        self.name = name or getattr(model.config, "name_or_path", None) or model.config.model_type
        n_layers = len(attention_modules(model))
        self.attention_layers = self._attention_layers(n_layers)
        self.logits = LogitObserver(self.config)
        self.hidden = HiddenStateObserver(
            model, resolve_hidden_layers(self.config.hidden_layers, n_layers), self.config
        )
        self.geometry: CaptureGeometry | None = None
        self.n_windows = 0
        self._handle: PolicyHandle | None = None
        self._length_hook: torch.utils.hooks.RemovableHandle | None = None

    def _attention_layers(self, n_layers: int) -> list[int]:
        layers = list(range(n_layers)) if self.config.layers is None else sorted(set(self.config.layers))
        if any(not 0 <= layer < n_layers for layer in layers):
            raise OodlensError(f"layers {self.config.layers} must lie in 0..{n_layers - 1}")
        return layers

    def open(self) -> None:
        """Apply the policy with the observer on the chosen layers and attach the hooks."""
        self._handle = apply_policy(
            self.model,
            self.policy,
            observer=self.logits,
            train_length=self.train_length,
            block_size=self.config.block_size,
        )
        for module in attention_modules(self.model):
            if module.layer_idx not in self.attention_layers:
                attention.binding_of(module).observer = None  # the engine then skips all observer work there
        first_layer = decoder_layers(self.model)[0]
        self._length_hook = first_layer.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self.hidden.attach()

    def close(self) -> None:
        """Remove the hooks and restore the attention implementation (idempotent; safe if open failed)."""
        try:
            self.hidden.detach()
            if self._length_hook is not None:
                self._length_hook.remove()
                self._length_hook = None
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Fix the geometry at the first forward; count windows; refuse a different length."""
        batch, length = _sequence_shape(args, kwargs)
        if self.geometry is None:
            self.geometry = resolve_geometry(self.config, length, self.train_length)
            self.logits.begin(self.geometry)
            self.hidden.begin(self.geometry)
        elif length != self.geometry.length:
            raise OodlensError(
                f"capture saw windows of {self.geometry.length} tokens, then a forward of {length}: capture "
                "each length separately (decoding steps against a cache are not captured)"
            )
        self.hidden.begin_forward(self.n_windows)
        self.n_windows += batch

    def run(self, input_ids: torch.Tensor) -> None:
        """One captured forward of ``input_ids [B, T]`` (only the last position gets vocabulary logits)."""
        with torch.no_grad():
            self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    def result(self) -> Diagnosis:
        """The :class:`Diagnosis` of everything captured so far."""
        if self.geometry is None:
            raise OodlensError("nothing was captured: run at least one forward inside the capture")
        tables = {**self.logits.tables(), **self.hidden.tables()}
        samples = self.hidden.samples()
        tables["position_probe"] = position_probe(samples, self.config.start_tokens, self.config.seed)
        return Diagnosis(self._meta(), {kind: tables[kind] for kind in TABLE_KINDS}, samples)

    def _meta(self) -> dict[str, Any]:
        parameter = next(self.model.parameters())
        policy = self._handle.policy if self._handle is not None else self.policy.resolve(self.train_length)
        g = self.geometry
        return {
            "model": self.name,
            "train_length": self.train_length,
            "length": g.length,
            "n_windows": self.n_windows,
            "policy": asdict(policy),
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": str(parameter.device),
            "attention_layers": self.attention_layers,
            "hidden_layers": self.hidden.layer_indices,
            "query_stride": g.query_stride,
            "n_sampled_queries": len(g.sampled_positions),
            "config": {
                key: (list(value) if isinstance(value, Sequence) else value)
                for key, value in asdict(self.config).items()
            },
            "versions": runtime_versions(),
        }


@contextmanager
def capture(
    model: nn.Module,
    policy: Policy | None = None,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
) -> Iterator[CaptureSession]:
    """Capture every forward run inside the block; ``session.result()`` gives the :class:`Diagnosis`.

    The model's attention implementation and hooks are restored on exit, also when the block raises.

    Example::

        with capture(model, lm_infinite()) as session:
            model(ids, logits_to_keep=1)
        diagnosis = session.result()
    """
    session = CaptureSession(model, policy, config, train_length, name)
    try:
        session.open()
        yield session
    finally:
        session.close()


def diagnose(
    model: nn.Module,
    input_ids: torch.Tensor,
    policy: Policy | None = None,
    *,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
) -> Diagnosis:
    """Capture the three OOD factors of ``model`` on ``input_ids [n_windows, length]``, one forward a window.

    Args:
        policy: attention policy to diagnose (``None``: vanilla); the same call with ``lm_infinite()`` shows
            the fix.
        config: what to capture (:class:`CaptureConfig` defaults otherwise).
        train_length: the pretraining length (default: read from the model's config).
        name: model name for ``meta`` (default: the config's ``name_or_path``).
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    device = next(model.parameters()).device
    with capture(model, policy, config, train_length, name) as session:
        for window in ids:
            session.run(window.unsqueeze(0).to(device))
    return session.result()


__all__ = [
    "TABLE_KINDS",
    "CaptureConfig",
    "CaptureGeometry",
    "CaptureSession",
    "Diagnosis",
    "HiddenStateObserver",
    "LogitObserver",
    "capture",
    "decoder_layers",
    "diagnose",
    "position_probe",
    "resolve_geometry",
]
