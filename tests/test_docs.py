"""Every Python block in the README and in docs/ runs as written (on a tiny model, at tiny lengths)."""

from __future__ import annotations

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
