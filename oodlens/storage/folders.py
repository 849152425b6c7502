"""Folders written whole, and never over something oodlens did not write.

Folders go through :func:`preflight` and :meth:`FolderWriter.commit` (:func:`write_folder` does both at once):

1. ``preflight``, before any computation, refuses a target that must not be replaced
   (:func:`check_replaceable`), takes an exclusive lock for the target, repairs what a killed writer left
   (:func:`recover`), and creates the hidden staging folder ``.NAME.partial-PID-ID`` beside the target with a
   test file in it, so a bad location fails in seconds instead of after hours.
2. ``commit(fill)`` fills the staging folder, marks it as a whole oodlens folder (:data:`MARKER`, whose ``id``
   is the staging folder's ID), checks the target again and swaps the folder in: in one atomic step where the
   system has one (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS), else by
   two renames through ``.NAME.old-PID-ID``. When the target cannot be written at the end, the finished
   content is kept (beside the target as ``NAME.kept-ID``, or under the system's temporary folder) and the
   error says where.

A process may die at any point, even by SIGKILL: the lock is an ``flock`` on ``.NAME.lock``, which the kernel
drops with its holder, and every leftover carries the PID of the process that made it. The next writer of the
target (or a reader calling :func:`recover`) finishes a swap that was cut short when its staging folder is
whole, else puts the old folder back, and deletes the staging folders of dead processes.

POSIX only (Linux, macOS), like the rest of oodlens. The guarantees are against a process dying, not against
power loss: nothing is fsync'ed, which keeps the multi-gigabyte model copies cheap to write."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from ..errors import OodlensError, first_line
from .files import installed_version
from .paths import PathLike, absolute, hidden_name, leftovers, make_parent, remove

# What makes a folder replaceable by oodlens: JSON with "kind", "id", "oodlens" (version), "written" (time).
MARKER = ".oodlens-folder.json"


def folder_kind(path: PathLike) -> str | None:
    """The kind of oodlens folder at ``path`` (``"report"``, ``"diagnosis"``, …), or None if it is not one."""
    try:
        kind = json.loads((Path(path) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def is_oodlens_folder(path: PathLike, kind: str | None = None) -> bool:
    """Whether oodlens wrote the folder at ``path`` (as a folder of ``kind``, when given)."""
    found = folder_kind(path)
    return found is not None and kind in (None, found)


def check_replaceable(target: PathLike, kind: str, overwrite: bool) -> None:
    """Refuse a target that must not become a ``kind`` folder, so nothing of the user's is ever deleted.

    Allowed: a path that does not exist, an empty folder, and (with ``overwrite``) an oodlens folder of the
    same ``kind``. Refused: the root, home or current folder or a folder that holds one, a symbolic link, a
    file, a folder oodlens did not write (or wrote as another kind), and an earlier ``kind`` folder without
    ``overwrite``.

    Raises:
        OodlensError: naming the reason and the fix."""
    target = absolute(target)
    real = Path(os.path.realpath(target))
    if real.parent == real:
        raise OodlensError(f"{target} is the root folder: choose a new folder for the output")
    for name, place in (("your home folder", Path.home()), ("the current folder", Path.cwd())):
        place = Path(os.path.realpath(place))
        if real == place or real in place.parents:
            raise OodlensError(
                f"{target} is {name} or holds it, so oodlens will not replace it: choose another"
            )
    if target.is_symlink():
        raise OodlensError(f"{target} is a symbolic link: pass the folder it points to, or a new path")
    if not target.exists():
        return
    if not target.is_dir():
        raise OodlensError(
            f"{target} is a file, and oodlens replaces only its own folders: choose another path"
        )
    if not any(target.iterdir()):
        return
    found = folder_kind(target)
    if found != kind:
        what = "was not written by oodlens" if found is None else f"holds an oodlens {found}, not a {kind}"
        raise OodlensError(f"{target} {what}, so oodlens will not replace it: choose another path")
    if not overwrite:
        raise OodlensError(
            f"{target} already holds an oodlens {kind}: pass --overwrite (overwrite=True in Python) or "
            "choose another path"
        )


class FolderWriter:
    """A folder write prepared by :func:`preflight`: it holds the target's lock and the staging folder until
    :meth:`commit` swaps the filled folder into place. Use it as a context manager, so the lock is released
    and an unused staging folder removed whatever happens in between."""

    def __init__(self, target: Path, kind: str, overwrite: bool, temp_fallback: bool, lock: _Lock) -> None:
        self.target, self.kind, self.overwrite = target, kind, overwrite
        self._temp_fallback, self._lock = temp_fallback, lock
        self._id = secrets.token_hex(4)
        self.staging = hidden_name(target, "partial", self._id)
        self._staging_settled = False  # True once the staging folder is in place, kept, or handed on

    def commit(self, fill: Callable[[Path], None]) -> Path:
        """Fill the (empty, existing) staging folder with ``fill(staging)``, swap it in, return the target.

        When writing beside the target fails (a full disk, say), ``fill`` is called once more on a fresh
        folder under the system's temporary folder, so that hours of computation are not lost: it must not
        consume its input. The writer is closed afterwards, whatever happens.

        Raises:
            OodlensError: the content could not be put at the target; the message says where it is kept, if
                anywhere. An error that ``fill`` raises other than OSError is passed on as it is."""
        if self._lock is None:
            raise RuntimeError("this FolderWriter is closed: call preflight again")
        try:
            try:
                fill(self.staging)
                _mark(self.staging, self.kind, self._id)
            except OSError as error:
                raise self._rescue(fill, error) from error
            try:
                check_replaceable(self.target, self.kind, self.overwrite)  # something may have appeared since
                replaced = _install(self.staging, self.target, self._id)
            except (OodlensError, OSError) as error:
                kept = self._keep()
                raise OodlensError(
                    f"{self.target} was not written ({first_line(error)}); the finished {self.kind} is kept "
                    f"at {kept}: move it where you want it"
                ) from error
            self._staging_settled = True
            if replaced is not None:
                remove(replaced)
            return self.target
        finally:
            self.close()

    def close(self) -> None:
        """Remove the staging folder unless it was swapped in or kept, and release the lock. Idempotent."""
        if not self._staging_settled:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._staging_settled = True
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _rescue(self, fill: Callable[[Path], None], error: OSError) -> OodlensError:
        """After ``fill`` failed beside the target: fill a folder under the system's temporary folder instead,
        and say where it is (or that that failed too)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        failure = f"cannot write the {self.kind} at {self.target} ({first_line(error)})"
        if not self._temp_fallback:
            return OodlensError(f"{failure}: fix that or choose another output path")
        spare = None
        try:
            spare = Path(tempfile.mkdtemp(prefix=f"oodlens-{self.kind}-"))
            fill(spare)
            _mark(spare, self.kind, self._id)
        except Exception as second:  # any failure here is reported with the first one
            if spare is not None:
                shutil.rmtree(spare, ignore_errors=True)
            return OodlensError(
                f"{failure}, nor under {tempfile.gettempdir()} ({first_line(second)}): choose another path"
            )
        return OodlensError(f"{failure}; it is saved whole at {spare}: move it there once that is fixed")

    def _keep(self) -> Path:
        """Move the finished staging folder to the visible ``NAME.kept-ID`` beside the target; where even that
        fails it stays where it is, which :func:`recover` never deletes, since its marker says it is whole."""
        self._staging_settled = True
        kept = self.target.with_name(f"{self.target.name}.kept-{self._id}")
        try:
            os.rename(self.staging, kept)
        except OSError:
            return self.staging
        return kept


def preflight(
    target: PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    need_bytes: int = 0,
    wait_s: float = 0.0,
    temp_fallback: bool = True,
) -> FolderWriter:
    """Check, before any computation, that a ``kind`` folder can be written at ``target``; returns the writer
    that holds the target's lock until :meth:`FolderWriter.commit` (use it as a context manager).

    ``need_bytes``: refuse at once when the disk has less free space. ``wait_s``: how long to wait for another
    process writing the same target (default: fail at once, naming its PID). ``temp_fallback``: on a failed
    write at the end, write once more under the system's temporary folder (off for content that is cheap to
    recompute, such as a cache).

    Raises:
        OodlensError: the target must not be replaced (:func:`check_replaceable`), another process is writing
            it, or nothing can be written there."""
    target = absolute(target)
    check_replaceable(target, kind, overwrite)  # before anything is created
    make_parent(target)
    cannot = f"cannot write in {target.parent}"
    try:
        lock = _Lock(target, wait_s)
    except OSError as error:
        raise OodlensError(f"{cannot} ({first_line(error)}): choose another output path") from error
    writer = FolderWriter(target, kind, overwrite, temp_fallback, lock)
    try:
        _repair(target)
        check_replaceable(target, kind, overwrite)  # the repair may have put a folder back
        free = shutil.disk_usage(target.parent).free
        if free < need_bytes:
            raise OodlensError(
                f"{cannot}: {free / 2**30:.1f} GiB free, {need_bytes / 2**30:.1f} GiB needed; free some "
                "space or choose another output path"
            )
        writer.staging.mkdir()
        probe = writer.staging / ".oodlens-write-test"
        probe.write_bytes(bytes(4096))
        probe.unlink()
    except OSError as error:
        writer.close()
        raise OodlensError(f"{cannot} ({first_line(error)}): choose another output path") from error
    except BaseException:
        writer.close()
        raise
    return writer


def write_folder(
    target: PathLike,
    fill: Callable[[Path], None],
    *,
    kind: str,
    overwrite: bool = False,
    wait_s: float = 0.0,
    temp_fallback: bool = True,
) -> Path:
    """:func:`preflight` and :meth:`FolderWriter.commit` in one call, for writes that follow no long
    computation (saving a diagnosis, caching a model copy); returns the target."""
    with preflight(
        target, kind=kind, overwrite=overwrite, wait_s=wait_s, temp_fallback=temp_fallback
    ) as writer:
        return writer.commit(fill)


def recover(target: PathLike) -> None:
    """Repair what a writer killed mid-write left at ``target`` (see the module docstring); for readers,
    before they read. Costs one folder listing when there is nothing to repair; does nothing while another
    process holds the target's lock (it is still writing and will leave a whole folder) or where nothing can
    be written."""
    target = absolute(target)
    if not leftovers(target, "partial|old", own=True):
        return
    try:
        lock = _Lock(target, wait_s=0.0)
    except (OodlensError, OSError):
        return
    try:
        _repair(target)
    finally:
        lock.release()


class _Lock:
    """An exclusive ``flock`` on ``.NAME.lock`` beside a target, holding the holder's PID. The kernel drops it
    when the holder dies; the holder removes the file on release, so the lock leaves nothing behind."""

    def __init__(self, target: Path, wait_s: float) -> None:
        self.path = target.parent / f".{target.name}.lock"
        deadline = time.monotonic() + wait_s
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise OodlensError(
                    f"{target} is being written by another process (pid {holder}): wait for it to finish or "
                    "choose another output path"
                ) from None
            except BaseException:
                os.close(descriptor)
                raise
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)  # the holder removed this file as we opened it: lock the new one
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        """Remove the lock file, then unlock: a waiter that opened the removed file sees it gone and retries.
        Unlocking explicitly (not only closing) also frees the lock in children forked meanwhile."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        os.close(self._descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _repair(target: Path) -> None:
    """Finish or undo a swap that dead writers of ``target`` cut short, and remove their leftovers. The caller
    holds the target's lock, so no living oodlens writer is midway.

    A staging folder whose marker carries its own ID is whole: with no target it is put in place (the swap it
    was made for is finished), else kept as ``NAME.kept-ID``. With no whole one, the newest ``.old`` folder is
    put back. Everything else (half-filled staging folders, replaced folders) is deleted."""
    found = leftovers(target, "partial|old", own=True)
    whole = [item for item in found if item.tag == "partial" and _marker_id(item.path) == item.id]
    olds = [item for item in found if item.tag == "old"]
    if not os.path.lexists(target) and (whole or olds):
        chosen = (whole or olds)[-1]
        os.rename(chosen.path, target)
        found.remove(chosen)
        done = "finished its swap" if chosen in whole else "put the previous folder back"
        warnings.warn(f"oodlens: a writer of {target} died mid-swap; {done}", stacklevel=3)
    for item in found:
        if item in whole:
            kept = target.with_name(f"{target.name}.kept-{item.id}")
            os.rename(item.path, kept)
            done = f"its output is at {kept}"
            warnings.warn(f"oodlens: a writer of {target} died before its swap; {done}", stacklevel=3)
        else:
            remove(item.path)


def _marker_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def _mark(folder: Path, kind: str, id_: str) -> None:
    """Write the marker last: its presence with the folder's own ID means every file before it is written."""
    oodlens = installed_version("oodlens")
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    marker = {"kind": kind, "id": id_, "oodlens": oodlens, "written": written}
    (folder / MARKER).write_text(json.dumps(marker))


def _install(staging: Path, target: Path, id_: str) -> Path | None:
    """Put the whole ``staging`` folder at ``target``; returns where the replaced folder now is, or None."""
    if not os.path.lexists(target):
        if not _rename_with("noreplace", staging, target):
            os.rename(staging, target)  # can replace only an empty folder that appeared meanwhile
        return None
    if _rename_with("exchange", staging, target):
        return staging  # now holds the replaced folder
    old = hidden_name(target, "old", id_)
    os.rename(target, old)
    os.rename(staging, target)  # a death between these two renames is repaired by _repair
    return old


# Linux renameat2: RENAME_NOREPLACE 1, RENAME_EXCHANGE 2; macOS renamex_np: RENAME_SWAP 2, RENAME_EXCL 4.
_RENAME_FLAGS = {"linux": {"noreplace": 1, "exchange": 2}, "darwin": {"noreplace": 4, "exchange": 2}}
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


@functools.cache
def _flagged_rename() -> Callable[[bytes, bytes, int], int] | None:
    """The C library's rename with flags (``renameat2`` on Linux, ``renamex_np`` on macOS), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform == "linux" and hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda source, destination, flags: renameat2(_AT_FDCWD, source, _AT_FDCWD, destination, flags)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        renamex_np = libc.renamex_np
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return renamex_np
    return None


def _rename_with(how: str, source: Path, destination: Path) -> bool:
    """Rename atomically with ``how`` (``"noreplace"``: fail if ``destination`` exists; ``"exchange"``: swap
    the two). False where the system or file system cannot, so the caller falls back to plain renames."""
    rename = _flagged_rename()
    if rename is None:
        return False
    if rename(os.fsencode(source), os.fsencode(destination), _RENAME_FLAGS[sys.platform][how]) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(destination))
