"""Where storage puts its hidden working files and folders, and how it finds what a killed writer left.

Every temporary name is ``.NAME.TAG-PID-ID`` beside the target ``NAME``: hidden, unique, and carrying the PID
of the process that made it, so a later writer can tell a live writer's work from a dead one's leftovers."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import OodlensError, first_line

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Leftover:
    path: Path
    tag: str  # "partial", "old" or "tmp"
    id: str
    mtime: float


def absolute(target: PathLike) -> Path:
    """``target`` with ``~`` expanded, made absolute without following links (``""``: the current folder)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(target) or ".")))


def make_parent(target: Path) -> None:
    for ancestor in reversed(target.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise OodlensError(f"{ancestor} is a file, so nothing can be written under it: choose another")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = first_line(error)
        raise OodlensError(f"cannot create {target.parent} ({reason}): choose another path") from error


def hidden_name(target: Path, tag: str, id_: str, end: str = "") -> Path:
    """``.NAME.TAG-PID-ID[END]`` beside ``target``: hidden, unique, and telling which process made it."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{id_}{end}"


def leftovers(target: Path, tags: str, *, own: bool, end: str = "") -> list[Leftover]:
    """Hidden siblings of ``target`` (see :func:`_hidden_name`) with a tag in ``tags`` (``"a|b"``) made by
    processes that are no longer alive, oldest first; with ``own``, also those of this process, which are
    stale for a holder of the target's lock (no other writer of the target can be midway in this process:
    a second ``flock`` fails even here), but may be in use otherwise."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({tags})-(\d+)-([0-9a-f]+){re.escape(end)}")
    prefix = f".{target.name}."
    found = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name) if entry.name.startswith(prefix) else None
        if match is None:
            continue
        pid = int(match[2])
        if (pid != os.getpid() or not own) and alive(pid):
            continue
        with contextlib.suppress(OSError):
            mtime = entry.stat(follow_symlinks=False).st_mtime
            found.append(Leftover(Path(entry.path), match[1], match[3], mtime))
    return sorted(found, key=lambda leftover: leftover.mtime)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
