"""The one place that writes files and folders: atomically, and never over something oodlens did not write.

- Files (:func:`atomic_write_text`, :func:`atomic_path`) are written under a hidden temporary name in the
  same folder and renamed into place, so a reader never sees half a file.
- Folders (:func:`write_folder`) are filled in a hidden staging folder beside the target, marked as oodlens'
  own, and swapped into place. An existing target is replaced only if it is empty or carries the marker of an
  oodlens folder of the same kind; a file, the current folder or a folder of the user's is refused.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OodlensError

MARKER = ".oodlens-folder.json"  # what makes a folder replaceable by oodlens


def json_ready(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither); numpy scalars become Python numbers; tuples lists."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def runtime_versions() -> dict[str, str]:
    """Versions of Python, torch, transformers and oodlens (with its git commit when run from a checkout)."""
    import torch
    import transformers

    try:
        version = importlib.metadata.version("oodlens")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "oodlens": version,
    }
    commit = git_commit()
    if commit is not None:
        versions["oodlens_commit"] = commit
    return versions


def git_commit() -> str | None:
    """oodlens' git commit (with ``-dirty`` for uncommitted changes) when it runs from a checkout, else None."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        found = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None


def _hidden_sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``target``; on success it is renamed to ``target``, on error
    removed. ``with atomic_path(out) as tmp: figure.savefig(tmp)``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise OodlensError(f"{str(target)!r} is a folder: choose a file path")
    temporary = _hidden_sibling(target, "tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as temporary:
        temporary.write_text(text)
    return Path(target)


def write_json(target: str | os.PathLike[str], value: Any) -> Path:
    """Write ``value`` as indented JSON (see :func:`json_ready`) atomically."""
    return atomic_write_text(target, json.dumps(json_ready(value), indent=2, allow_nan=False))


def folder_kind(path: Path) -> str | None:
    """The kind of oodlens folder at ``path`` (``"report"``, ``"diagnosis"``, …), or None if not one."""
    try:
        return json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_replaceable(target: Path, kind: str, overwrite: bool) -> None:
    """Refuse a target that must not be replaced: a file, the current folder or one above it, a folder that is
    neither empty nor an oodlens folder of ``kind``, or any non-empty folder without ``overwrite``."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise OodlensError(f"{str(target)!r} is a file: choose a folder path that does not exist yet")
    cwd = Path.cwd().resolve()
    if target.exists() and (target.resolve() == cwd or target.resolve() in cwd.parents):
        raise OodlensError(f"{str(target)!r} is the current folder or holds it: choose a new folder")
    if target.is_dir() and any(target.iterdir()):
        found = folder_kind(target)
        if found != kind:
            what = (
                "was not written by oodlens" if found is None else f"holds an oodlens {found}, not a {kind}"
            )
            raise OodlensError(f"{str(target)!r} {what}, so oodlens will not replace it: choose another path")
        if not overwrite:
            raise OodlensError(
                f"{str(target)!r} already holds a {kind}; pass --overwrite or choose another path"
            )


def write_folder(
    target: str | os.PathLike[str], fill: Callable[[Path], None], *, kind: str, overwrite: bool = False
) -> Path:
    """Fill a staging folder with ``fill(staging)`` and swap it in at ``target`` (see the module docstring).

    Raises:
        OodlensError: ``target`` must not be replaced (:func:`check_replaceable`).
    """
    target = Path(os.path.abspath(target))
    check_replaceable(target, kind, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        fill(staging)
        (staging / MARKER).write_text(json.dumps({"kind": kind, "written": time.time()}))
        check_replaceable(target, kind, overwrite)  # again: something may have appeared meanwhile
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = _hidden_sibling(target, "old")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
