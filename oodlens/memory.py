"""This process's memory, for benchmarks: the current resident size, the peak, and a reset of the peak.

On Linux the peak (``VmHWM``) can be reset to the current size, so a benchmark can leave model loading out
of the peak of a forward; elsewhere the peak is ``getrusage``'s lifetime maximum and the current size is
not known. On a CUDA device the peak is the allocator's (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import math
import re
import resource
import sys
from pathlib import Path

import torch


def reset_peak_memory() -> bool:
    """Reset this process's peak resident set to its current size (Linux); False where that is unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def resident_gib() -> tuple[float, float]:
    """``(current, peak)`` resident set of this process in GiB (peak since the last reset on Linux).

    Without ``/proc`` the current size is NaN and the peak is the process's lifetime maximum.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    found = {key: re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE) for key in ("VmRSS", "VmHWM")}
    if found["VmRSS"] and found["VmHWM"]:
        return int(found["VmRSS"].group(1)) / 2**20, int(found["VmHWM"].group(1)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return math.nan, peak / (2**30 if sys.platform == "darwin" else 2**20)


def reset_device_peak(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator peak on a CUDA device, else this process's resident set (which
    also restarts any peak an outer measurement was reading). False where the peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_memory()


def device_peak_gib(device: torch.device, was_reset: bool = True) -> float:
    """Peak memory in GiB since :func:`reset_device_peak`: allocated on a CUDA device, else resident; NaN
    when the peak was not reset (``was_reset``: what the reset returned), as the lifetime peak is another
    number."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resident_gib()[1] if was_reset else math.nan
