"""Every analysis script runs end to end with ``--quick`` on a tiny model and writes its figures."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import matplotlib.image
import pytest

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"
sys.path.insert(0, str(ANALYSES))

EXPECTED = {
    "fig1_three_factors": ["fig1a_logits_by_distance", "fig1b_entropy_by_position", "fig1c_hidden_pca"],
    "fig3_perplexity": ["fig3_perplexity_by_position"],
    "fig5_ablation": ["fig5_ablation", "fig5_ablation_bars"],
    "table2_passkey": ["table2_passkey"],
    "table3_generation": ["table3_generation"],
    "efficiency": ["efficiency"],
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
