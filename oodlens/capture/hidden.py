"""Factor 3 (starting tokens): forward hooks on chosen decoder layers that reduce their output hidden states
inside the hook: norm and cosine to the mean of later positions by position bin, and a sample of hidden
vectors for PCA and the position probe."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import OodlensError, non_finite_note
from .config import CaptureConfig, CaptureGeometry
from .diagnosis import empty_table

DEFAULT_HIDDEN_LAYERS = (1, 2, 5, 10, -1)  # -1: the last layer; the paper's appendix shows 1, 2, 3, 5, 10, 20


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
        self.first_cosine_count = torch.zeros_like(self.first_norm_sum)
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

    def __init__(self, decoder_layers: Sequence[nn.Module], layers: Sequence[int], config: CaptureConfig):
        self.config = config
        self.layer_indices = list(layers)
        self.geometry: CaptureGeometry | None = None
        self.layers: dict[int, LayerHiddenStats] = {}
        self.non_finite: dict[str, str] = {}  # place → warning, for the diagnosis' meta
        self._modules = list(decoder_layers)
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
                g, min(self.config.unbinned_positions, g.length), hidden.device
            )
        layer = self.layers[layer_idx]
        where = f"the hidden states of layer {layer_idx}"
        if not bool(torch.isfinite(hidden).all()):
            if where not in self.non_finite:
                self.non_finite[where] = non_finite_note(where, hidden.dtype)
                warnings.warn(f"oodlens: {self.non_finite[where]}", stacklevel=2)
            hidden = hidden.nan_to_num(nan=math.nan, posinf=math.nan, neginf=math.nan)  # NaN marks them
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
            layer.first_norm_sum[: min(n_first, length)] += norm[:n_first]
            layer.first_count[: min(n_first, length)] += 1
            layer.first_cosine_sum[: min(n_first, length - 1)] += cosine[:n_first]
            layer.first_cosine_count[: min(n_first, length - 1)] += 1
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
            return {name: empty_table(name) for name in ("hidden_by_position", "hidden_first_positions")}
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
            with np.errstate(invalid="ignore", divide="ignore"):  # NaN where no window reached a position
                cosine = layer.first_cosine_sum.cpu().numpy() / layer.first_cosine_count.cpu().numpy()
            first.append(
                pd.DataFrame(
                    {
                        "layer": index,
                        "position": np.arange(n_first),
                        "norm": np.divide(layer.first_norm_sum.cpu().numpy(), first_count),
                        "cosine_to_later": cosine,
                    }
                )
            )
        return {
            "hidden_by_position": pd.concat(by_position, ignore_index=True),
            "hidden_first_positions": pd.concat(first, ignore_index=True),
        }
