"""Files written atomically (a hidden temporary beside the target, renamed into place), JSON made plain, and
the versions a result records."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OodlensError
from .paths import PathLike, hidden_name, leftovers, remove


def json_ready(value: Any) -> Any:
    """``value`` with what ``json.dumps`` refuses or misreads made plain: NaN and infinities become None (JSON
    has neither), numpy scalars and arrays Python numbers and lists, tuples lists, dictionary keys strings."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def runtime_versions() -> dict[str, str]:
    """Versions of Python, torch, transformers and oodlens, plus oodlens' git commit when run from a checkout.

    Read from package metadata, so recording them imports neither torch nor transformers; a package that is
    not installed is left out."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "oodlens"):
        version = installed_version(package)
        if version is not None:
            versions[package] = version
    commit = git_commit()
    if commit is not None:
        versions["oodlens_commit"] = commit
    return versions


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> str | None:
    """oodlens' git commit (``-dirty`` when files differ from it) when it runs from a checkout, else None.

    Asked once per process; an installed copy (no ``.git`` beside the package) never starts git."""
    return _describe(Path(__file__).resolve().parents[2])  # the checkout holding oodlens/storage/


def _describe(checkout: Path) -> str | None:
    """``git describe`` of ``checkout``, or None when it is no checkout or git is missing or fails."""
    if not (checkout / ".git").exists():
        return None
    try:
        found = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(checkout), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (found.stdout.strip() or None) if found.returncode == 0 else None


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``target``; renamed to ``target`` on success, removed on error.

    For writers that want a path rather than bytes: ``with atomic_path(out) as tmp: figure.savefig(tmp)``.
    The temporary name ends with ``target``'s suffix, so writers that choose a format by it (or add one, as
    ``numpy.save`` does) behave as for ``target``."""
    target = Path(target)
    if target.is_dir():
        raise OodlensError(f"{target} is a folder: choose a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in leftovers(target, "tmp", end=target.suffix, own=False):  # of writers killed mid-write
        remove(leftover.path)
    temporary = hidden_name(target, "tmp", secrets.token_hex(4), end=target.suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(target: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (:func:`atomic_path`)."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
    return Path(target)


def atomic_write_text(target: PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically, as UTF-8 whatever the locale."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def write_json(target: PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON (made plain by :func:`json_ready`) atomically."""
    return atomic_write_text(target, json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n")
