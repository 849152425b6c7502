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


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, ...]`` → ``[H, B·…]`` (a view when B = 1)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)
