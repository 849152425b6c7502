"""What a capture records and how finely: :class:`CaptureConfig`, and the bins and sampled queries it
resolves to for a given length (:class:`CaptureGeometry`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OodlensError

UNIT_DISTANCE_BINS = 64  # distances 0..63 get a bin each: the closest keys matter most
LOG_BINS_PER_OCTAVE = 8


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
        n_global: the sink mass is the attention on keys at positions ``< n_global``.
        query_stride: the full logit rows of every ``query_stride``-th query (and always the last one) are
            captured; ``None`` = ``ceil(length / sampled_queries)``; 1 = every query (costs ``Q × n`` memory
            per block).
        sampled_queries: about how many queries to sample when ``query_stride`` is ``None``.
        hidden_head_positions: the hidden-state sample holds every one of the first positions…
        hidden_stratified_positions: …and one random position from each of this many equal strata after them.
        unbinned_positions: hidden-state norm and cosine are also kept unbinned for these first positions.
        n_global: the probe's classification target is "position < n_global".
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
    n_global: int = 4
    query_stride: int | None = None
    sampled_queries: int = 256
    hidden_head_positions: int = 256
    hidden_stratified_positions: int = 768
    unbinned_positions: int = 64
    n_global: int = 4
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
