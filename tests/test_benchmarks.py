"""The memory-trace benchmark on a tiny model: one row per layer's attention and MLP, peaks never fall."""

from __future__ import annotations

from pathlib import Path

import pytest
from memory_trace import trace  # benchmarks/ is on sys.path through pytest's pythonpath


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method", ["vanilla", "lm-infinite"])
def test_memory_trace_rows(method):
    rows = trace("tiny:llama", method, 200)
    points = [point for point, _, _ in rows]
    assert points[0] == "start"
    assert points[1:] == [f"layer {i} {part}" for i in range(2) for part in ("attention", "mlp")]
    peaks = [peak for _, _, peak in rows]
    assert peaks == sorted(peaks)
    assert all(current <= peak + 1e-9 for _, current, peak in rows)
