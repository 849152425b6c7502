"""Every analysis script runs end to end with ``--quick`` on a tiny model and writes its figures."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"  # on sys.path through pytest's pythonpath

EXPECTED = {
    "fig1_three_factors": ["fig1a_logits_by_distance", "fig1b_entropy_by_position", "fig1c_hidden_pca"],
    "fig3_perplexity": ["fig3_perplexity_by_position"],
    "fig5_ablation": ["fig5_ablation", "fig5_ablation_bars"],
    "table2_passkey": ["table2_passkey"],
    "table3_generation": ["table3_generation"],
    "efficiency": ["efficiency"],
    "compare_methods": ["compare_perplexity_by_position", "compare_repair_map", "compare_tasks"],
    "streaming_1m": ["streaming_1m"],
}


def test_every_script_is_listed():
    from run_all import SCRIPTS

    scripts = {p.stem for p in ANALYSES.glob("*.py")} - {"common", "run_all"}
    assert scripts == set(SCRIPTS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_run_writes_figures(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ANALYSES.parent))  # efficiency runs its cases in subprocesses
    module = importlib.import_module(name)
    argv = ["--quick", "--out", str(tmp_path)]
    if name == "table3_generation":
        argv += ["--milestones", "100,200", "--new-tokens", "16"]
    module.run(argv)
    for stem in EXPECTED[name]:
        png = tmp_path / f"{stem}.png"
        assert png.stat().st_size > 10_000 and (tmp_path / f"{stem}.pdf").exists()
        assert matplotlib.image.imread(png).std() > 0.01
    assert any((tmp_path / "cache" / name).iterdir())
    # a second run reads the cache instead of recomputing
    module.run(argv)


@pytest.fixture
def stand_in_scripts(tmp_path, monkeypatch):
    """run_all over three stand-in scripts that log their name, thread setting and arguments."""
    import run_all

    log = tmp_path / "log.txt"
    body = (
        "import os, sys, time\n"
        "time.sleep({pause})\n"
        "with open({log!r}, 'a') as f:\n"
        "    f.write(' '.join([{name!r}, os.environ.get('OMP_NUM_THREADS', '-'), *sys.argv[1:]]) + '\\n')\n"
        "sys.exit({status})\n"
    )
    for name, pause, status in (("long", 0.5, 0), ("short", 0.0, 0), ("timed", 0.0, 0), ("broken", 0.0, 3)):
        (tmp_path / f"{name}.py").write_text(body.format(pause=pause, log=str(log), name=name, status=status))
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "FIGURES", tmp_path / "figures")  # timings.json stays out of the repository
    monkeypatch.setattr(run_all, "TIMED_ALONE", ("timed",))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_all.os, "cpu_count", lambda: 2)
    return run_all, log


def test_run_all_shares_the_cores_then_times_alone(stand_in_scripts, monkeypatch, capsys):
    run_all, log = stand_in_scripts
    monkeypatch.setattr(run_all, "FIGURE_SCRIPTS", ("long", "short"))
    run_all.main(["--quick", "--recompute"])  # default: 2 jobs on 2 cores, one thread each
    lines = log.read_text().splitlines()
    assert lines == [
        "short 1 --quick --recompute",
        "long 1 --quick --recompute",
        "timed - --quick --recompute",
    ]
    printed = capsys.readouterr().out
    assert printed.index("=== short: ") < printed.index("=== long: ") < printed.index("=== timed: ")
    log.unlink()
    run_all.main(["--jobs", "1"])  # one at a time: every core for every script, in order
    assert log.read_text().splitlines() == ["long -", "short -", "timed -"]


def test_run_all_names_the_script_that_failed(stand_in_scripts, monkeypatch, capsys):
    run_all, log = stand_in_scripts
    monkeypatch.setattr(run_all, "FIGURE_SCRIPTS", ("broken", "short"))
    with pytest.raises(SystemExit, match="failed: broken"):
        run_all.main([])
    assert "=== broken: 0 s, FAILED (exit 3) ===" in capsys.readouterr().out
    assert sorted(line.split()[0] for line in log.read_text().splitlines()) == ["broken", "short", "timed"]
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        run_all.main(["--jobs", "0"])


def test_efficiency_keeps_the_best_run_per_case():
    import pandas as pd
    from efficiency import table

    runs = pd.DataFrame(
        {
            "method": ["vanilla", "vanilla", "lm-infinite", "lm-infinite"] * 2,
            "length": [100, 100, 100, 100, 200, 200, 200, 200],
            "repeat": [0, 1, 0, 1, 0, 1, 0, 1],
            "seconds": [1.0, 0.8, 0.9, 1.1, 4.0, 3.0, 2.0, 2.5],
            "peak_gib": [1.0, 1.2, 0.9, 0.8, 2.0, 2.1, 1.5, 1.4],
        }
    )
    result = table(runs).set_index(["method", "length"])
    assert result.loc[("vanilla", 200), "seconds"] == 3.0
    assert result.loc[("lm-infinite", 100), "peak_gib"] == 0.8
    assert (result.runs == 2).all()
    # marginal ms per token of lm-infinite between 100 and 200 tokens: (2.0 - 0.9) s / 100 tokens
    assert result.loc[("lm-infinite", 200), "marginal_ms_per_token"] == pytest.approx(11.0)
    assert result.loc[("lm-infinite", 200), "time_ratio"] == pytest.approx(2.0 / 3.0)


def test_efficiency_cache_serves_fewer_repeats_only():
    from efficiency import _more_repeats

    stored = {"model": "m", "lengths": [8, 16], "repeats": 2}
    assert _more_repeats(stored, {"model": "m", "lengths": [8, 16], "repeats": 1})
    assert not _more_repeats(stored, {"model": "m", "lengths": [8, 16], "repeats": 3})
    assert not _more_repeats(stored, {"model": "m", "lengths": [8, 32], "repeats": 1})
    # results stored before repeats existed count as one run
    assert _more_repeats({"model": "m"}, {"model": "m", "repeats": 1})


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_efficiency_peak_memory_counts_from_the_reset():
    # a fresh process: the allocator settings of earlier in-process runs must not hide the new block
    check = """
import numpy as np
from oodlens.memory import reset_peak_memory, resident_gib
block = np.ones(300 * 2**20 // 8)
del block
assert reset_peak_memory()
before = resident_gib()[1]
block = np.ones(100 * 2**20 // 8)
grown = resident_gib()[1] - before
assert 0.08 < grown < 0.2, grown
"""
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ANALYSES)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_freed_memory_keeps_large_blocks_in_the_heap(reuse):
    # a fresh process: in-process runs above have already changed this one's allocator
    check = f"""
import ctypes
import torch
import common
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if {reuse}:
    assert common.reuse_freed_memory()
block = torch.ones(64 * 2**20 // 4)
print(libc.mallinfo2().hblkhd)  # bytes in blocks mapped (and later unmapped) one by one
"""
    done = subprocess.run(
        [sys.executable, "-c", check], check=True, cwd=ANALYSES, capture_output=True, text=True
    )
    mapped = int(done.stdout.split()[-1])
    # glibc maps every block over 32 MiB by itself (fresh pages each time) unless told to reuse the heap
    assert mapped < 2**26 if reuse else mapped >= 2**26


def test_table2_lengths_run_apart_add_up(tmp_path):
    import table2_passkey

    base = ["--quick", "--out", str(tmp_path), "--prompts", "2"]
    table2_passkey.run([*base, "--lengths", "400"])
    assert list(table2_passkey.run([*base, "--lengths", "500"]).columns) == [400, 500]
    # other settings do not take the rows cached under these
    assert list(table2_passkey.run([*base[:-1], "1", "--lengths", "500"]).columns) == [500]


def test_run_all_records_the_time_of_every_script(stand_in_scripts, monkeypatch, tmp_path):
    run_all, _ = stand_in_scripts
    monkeypatch.setattr(run_all, "FIGURE_SCRIPTS", ("long", "broken"))
    with pytest.raises(SystemExit, match="failed: broken"):
        run_all.main(["--quick"])
    timings = json.loads((tmp_path / "figures" / "quick" / "timings.json").read_text())
    assert set(timings) >= {"date", "machine", "oodlens_commit", "total_seconds", "scripts"}
    assert timings["date"].endswith("+00:00") and timings["machine"]["cores"] == 2
    assert timings["machine"]["platform"] and "cpu" in timings["machine"]
    scripts = {script["name"]: script for script in timings["scripts"]}
    statuses = {name: script["status"] for name, script in scripts.items()}
    assert statuses == {"long": 0, "broken": 3, "timed": 0}
    assert all(script["seconds"] > 0 and script["arguments"] == ["--quick"] for script in scripts.values())
    assert scripts["long"]["seconds"] >= 0.5 and timings["total_seconds"] >= scripts["long"]["seconds"]
    assert (scripts["long"]["lane"], scripts["long"]["omp_num_threads"]) == ("shared", "1")
    assert (scripts["timed"]["lane"], scripts["timed"]["omp_num_threads"]) == ("alone", None)
    # --out chooses the folder, as it does for the scripts
    with pytest.raises(SystemExit):
        run_all.main(["--jobs", "1", "--out", str(tmp_path / "elsewhere")])
    elsewhere = json.loads((tmp_path / "elsewhere" / "timings.json").read_text())
    assert [script["name"] for script in elsewhere["scripts"]] == ["long", "broken", "timed"]


@pytest.mark.parametrize(
    "argv", [[], ["--quick"], ["--out", "there"], ["--quick", "--out", "x", "--recompute"]]
)
def test_run_all_records_timings_where_the_scripts_write(argv):
    import common
    import run_all

    settings = common.parse("any", "", None, argv, reuse_memory=False)
    assert run_all._figure_folder(argv) == settings.out


def test_streaming_copies_pool_their_buckets_with_an_interval():
    import pandas as pd
    from streaming_1m import copies

    # two copies of 20 tokens in 10-token buckets: the first scores 1 and 3 nats, the second 2 and 2
    frame = pd.DataFrame(
        {
            "method": ["m"] * 4,
            "start": [0, 10, 20, 30],
            "nll": [1.0, 3.0, 2.0, 2.0],
            "n_tokens": [10, 10, 10, 10],
            "peak_memory_gib": [1.0, 1.5, 1.2, 1.1],
            "seconds": [0.1, 0.1, 0.2, 0.2],
        }
    )
    table = copies(frame, 20).set_index("copy")
    assert table["ppl"].tolist() == pytest.approx([math.e**2, math.e**2])
    assert table.loc[0, "ppl_low"] == pytest.approx(math.e) and table.loc[0, "ppl_high"] > math.e**2.5
    assert (table.loc[1, "ppl_low"], table.loc[1, "ppl_high"]) == pytest.approx((math.e**2, math.e**2))
    assert table["n_buckets"].tolist() == [2, 2] and table["peak_memory_gib"].tolist() == [1.5, 1.2]
    assert table["ms_per_token"].tolist() == pytest.approx([10.0, 20.0])
