"""Shared fixtures: the real SmolLM2 (loaded once per session), parametrisation over the tiny families, and
the schema check of every summary a probe writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oodlens.models import LoadedModel, load_model
from oodlens.tiny import TINY_FAMILIES

# gpt2 has learned absolute positions; every other tiny family uses RoPE.
ROPE_TINY_FAMILIES = tuple(family for family in TINY_FAMILIES if family != "gpt2")


@pytest.fixture(scope="session", autouse=True)
def every_written_summary_follows_the_schema():
    """Every ``summary.json`` a probe writes in this test process is validated against the shipped schema as
    it is written (a test that writes an invalid one fails there, naming the folder); probes run as
    subprocesses are validated when their folders are collected."""
    from oodlens.probe import report
    from oodlens.probe.collect import validate_summary

    write_contents = report._write_contents

    def validated(result, root: Path) -> None:
        write_contents(result, root)
        validate_summary(json.loads((root / "summary.json").read_text()), str(root))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "_write_contents", validated)
        yield


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, float32 on CPU everywhere (about 30 s to load on 2 cores)."""
    return load_model("smollm2", device="cpu")


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family(request: pytest.FixtureRequest) -> str:
    """Each tiny family name in turn."""
    return request.param


@pytest.fixture(params=ROPE_TINY_FAMILIES)
def rope_tiny_family(request: pytest.FixtureRequest) -> str:
    """Each tiny RoPE family name in turn."""
    return request.param


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the real SmolLM2 as slow, so `-m "not slow"` selects the fast suite."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
