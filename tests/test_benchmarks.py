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


def test_decode_speed_prints_every_case_and_the_goals(capsys):
    from decode_speed import main

    main(["--model", "tiny:llama", "--contexts", "128,256", "--steps", "2", "--repeats", "1"])
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.strip()]
    for method in ("vanilla", "lm-infinite", "streaming-llm"):  # both modes at both contexts
        assert sum(row[:2] == [method, mode] for row in rows for mode in ("eager", "static")) == 4
    assert sum(row[:2] == ["self-extend", "eager"] for row in rows) == 2  # it has no static cache
    assert not any(row[:2] == ["self-extend", "static"] for row in rows)
    assert "LM-Infinite (static) ms/token from 128 to 256" in printed
    assert "goal ≥ 2.7× vanilla at 256 (eager)" in printed
