"""The running statistic every observer keeps: counts, moments and extremes per head and bin."""

from __future__ import annotations

import math

import numpy as np
import torch


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
        """Add float32 ``values [H, N]`` (all finite) into ``bins [N]`` (the same bins for every head).

        Values usually come in long runs of one bin (a block's queries share a position bin; a row's keys
        fall into distance bins in order), so each run is reduced first, without atomics, and only the runs
        are scattered into the bins: on a GPU, thousands of values scattered into one bin serialise on its
        atomic update (most of a capture's time in a profile on an H200)."""
        if not bins.numel():
            return
        run_bins, run_lengths = torch.unique_consecutive(bins, return_counts=True)
        lengths = run_lengths.expand(values.shape[0], -1).contiguous()
        index = run_bins.expand(values.shape[0], -1)
        wide = values.double()
        self.count.scatter_add_(1, index, run_lengths.double().expand_as(index))
        for target, source, reduce, into in (
            (self.total, wide, "sum", "sum"),
            (self.total_sq, wide * wide, "sum", "sum"),
            (self.max, values, "max", "amax"),
            (self.min, values, "min", "amin"),
        ):
            runs = torch.segment_reduce(source, reduce, lengths=lengths, axis=1, unsafe=True)
            target.scatter_reduce_(1, index, runs, into)

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


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, ...]`` → ``[H, B·…]`` (a view when B = 1)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)
