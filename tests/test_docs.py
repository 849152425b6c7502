"""Every Python block in the README and in docs/ runs as written (on a tiny model, at tiny lengths)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The blocks are written for SmolLM2 at its lengths; the test runs them on a tiny random model of the same
# kind (pretraining length 64) at lengths past it; passkey prompts keep the byte tokenizer's ≥ 340 tokens.
TINY = [
    ("smollm2", "tiny:llama"),
    ("16384", "160"),
    ("12288", "160"),
    ("8192", "64"),
    ("12000", "480"),
    ("4000", "400"),
    ("16000", "2000"),  # a RULER task prompt: the byte tokenizer needs ~600 tokens for niah_single
]


def python_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text[: match.start()].count("\n") + 1
            blocks.append((document.name, line, match.group(1)))
    return blocks


def test_the_documents_hold_python_blocks():
    names = {name for name, _, _ in python_blocks()}
    assert {"README.md", "capture.md", "evaluate.md", "plotting.md"} <= names


@pytest.mark.parametrize(("document", "line", "code"), python_blocks(), ids=lambda value: str(value)[:20])
def test_block_runs_as_written(document, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save write here
    for real, tiny in TINY:
        code = code.replace(real, tiny)
    exec(compile(code, f"{document}:{line}", "exec"), {"__name__": "__doc_block__"})


def test_every_test_the_guarantees_page_names_exists():
    """docs/guarantees.md backs each promise with named tests: a renamed or deleted test fails here."""
    named = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "guarantees.md").read_text()))
    defined = {
        name
        for path in (ROOT / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    assert len(named) >= 20
    assert sorted(named - defined) == []


def _block_after(text: str, marker: str) -> str:
    """The first fenced block after ``marker`` in ``text``."""
    return re.search(r"^```\w*\n(.*?)^```", text[text.index(marker) :], re.S | re.M).group(1)


def test_the_job_array_recipe_runs_resumes_and_collects(tmp_path):
    """docs/sweeps.md's sweep.txt and job script as written, each array task in turn on a tiny model, then
    the whole array again (every run skipped), then its comparison command."""
    import subprocess
    import sys

    import oodlens

    page = (ROOT / "docs" / "sweeps.md").read_text()
    lines = _block_after(page, "`sweep.txt`")
    for real, tiny in (("meta-llama/Llama-2-7b-hf", "tiny:llama"), ("8192 ", "400 "), ("16384", "480"),
                       ("32768", "560")):  # fmt: skip
        lines = lines.replace(real, tiny)
    (tmp_path / "sweep.txt").write_text(lines)
    script = _block_after(page, "`sweep.sbatch`").replace("python -m", f"{sys.executable} -m")
    script = script.replace("--device cuda", "--device cpu")
    (tmp_path / "sweep.sbatch").write_text(script)

    def array_task(index: int) -> str:
        environment = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(["bash", "sweep.sbatch"], cwd=tmp_path, env=environment, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    for index in (1, 2, 3):
        array_task(index)
    summaries = {path: path.stat().st_mtime_ns for path in tmp_path.glob("runs/*/summary.json")}
    assert len(summaries) == 3
    for index in (1, 2, 3):  # the array again, as after a failure: nothing left to do
        assert "nothing to do" in array_task(index)
    assert {path: path.stat().st_mtime_ns for path in summaries} == summaries
    table = oodlens.collect(str(tmp_path / "runs" / "llama2-*"))
    assert sorted(table.length.unique()) == [400, 480, 560]
    assert set(table[table.length == 560].method) == {"vanilla", "lm-infinite", "streaming-llm",
                                                       "vanilla-truncated"}  # fmt: skip
    compare = _block_after(page, "From the command line").replace("python -m", f"{sys.executable} -m")
    subprocess.run(["bash", "-c", compare], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "runs" / "llama2-comparison" / "comparison.md").exists()
