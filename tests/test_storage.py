"""oodlens.storage: each data-loss bug the review found, reproduced and shown impossible; crash states laid
out on disk and made by real processes killed with SIGKILL; atomic files, JSON and versions."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from oodlens import storage
from oodlens.errors import OodlensError
from oodlens.storage import (
    MARKER,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    files,
    folder_kind,
    folders,
    is_oodlens_folder,
    preflight,
    recover,
    runtime_versions,
    write_folder,
    write_json,
)

PACKAGE = Path(storage.__file__).parent.parent  # oodlens/


def fill_with(text: str):
    def fill(folder: Path) -> None:
        (folder / "result.txt").write_text(text)

    return fill


def oodlens_folder(path: Path, text: str = "earlier", kind: str = "report") -> Path:
    return write_folder(path, fill_with(text), kind=kind, overwrite=True)


def beside(path: Path) -> list[str]:
    """Everything in ``path``'s folder but ``path`` itself."""
    return sorted(entry.name for entry in path.parent.iterdir() if entry != path)


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(autouse=True)
def spare_root(tmp_path, monkeypatch) -> Path:
    """The system temporary folder, as far as rescued content goes: inside the test's folder."""
    root = tmp_path / "system-tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# --- Folders: what may be replaced --------------------------------------------------------------------------


def test_a_folder_is_written_whole_marked_and_alone(tmp_path):
    out = write_folder(tmp_path / "out", fill_with("new"), kind="report")
    assert (out / "result.txt").read_text() == "new"
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "report" and {"id", "oodlens", "written"} <= set(marker)
    assert (
        is_oodlens_folder(out)
        and is_oodlens_folder(out, "report")
        and not is_oodlens_folder(out, "diagnosis")
    )
    assert folder_kind(out) == "report" and folder_kind(tmp_path) is None
    assert beside(out) == ["system-tmp"]  # no lock file, no staging folder


def test_overwrite_never_deletes_a_folder_oodlens_did_not_write(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("mine")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for folder in (notes, model):
        with pytest.raises(OodlensError, match="was not written by oodlens") as caught:
            write_folder(folder, fill_with("new"), kind="report", overwrite=True)
        assert "\n" not in str(caught.value)
    assert (notes / "ideas.txt").read_text() == "mine" and (model / "config.json").read_text() == "{}"


def test_overwrite_replaces_an_oodlens_folder_of_the_same_kind_only_when_asked(tmp_path):
    out = oodlens_folder(tmp_path / "out")
    with pytest.raises(OodlensError, match="already holds an oodlens report"):
        write_folder(out, fill_with("new"), kind="report")
    with pytest.raises(OodlensError, match="holds an oodlens report, not a diagnosis"):
        write_folder(out, fill_with("new"), kind="diagnosis", overwrite=True)
    assert (out / "result.txt").read_text() == "earlier"
    write_folder(out, fill_with("new"), kind="report", overwrite=True)
    assert (out / "result.txt").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_folder(empty, fill_with("new"), kind="report")  # an empty folder needs no overwrite
    assert (empty / "result.txt").read_text() == "new"


def test_the_current_home_and_root_folders_and_their_parents_are_never_replaced(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    oodlens_folder(work)  # even an oodlens folder, once it is where the user stands
    oodlens_folder(home)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for target in ("", ".", work):
        with pytest.raises(OodlensError, match="the current folder or holds it"):
            preflight(target, kind="report", overwrite=True)
    with pytest.raises(OodlensError, match="or holds it"):  # holds both
        preflight(tmp_path, kind="report", overwrite=True)
    for target in (home, "~"):
        with pytest.raises(OodlensError, match="your home folder or holds it"):
            preflight(target, kind="report", overwrite=True)
    with pytest.raises(OodlensError, match="root folder"):
        preflight("/", kind="report", overwrite=True)
    assert (work / "result.txt").is_file() and (home / "result.txt").is_file()


def test_a_folder_is_never_saved_over_a_file_or_through_a_link(tmp_path):
    file = tmp_path / "out"
    file.write_text("precious")
    with pytest.raises(OodlensError, match="is a file"):
        write_folder(file, fill_with("new"), kind="report", overwrite=True)
    assert file.read_text() == "precious"
    link = tmp_path / "link"
    link.symlink_to(oodlens_folder(tmp_path / "report"))
    with pytest.raises(OodlensError, match="symbolic link"):
        write_folder(link, fill_with("new"), kind="report", overwrite=True)
    assert link.is_symlink() and (tmp_path / "report" / "result.txt").read_text() == "earlier"


# --- Folders: one writer at a time --------------------------------------------------------------------------


def test_a_second_writer_of_the_same_fresh_folder_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with preflight(out, kind="report") as first:
        started = time.monotonic()
        with pytest.raises(OodlensError, match=f"another process \\(pid {os.getpid()}\\)") as caught:
            preflight(out, kind="report")
        assert time.monotonic() - started < 1 and "\n" not in str(caught.value)
        first.commit(fill_with("first"))
    with pytest.raises(OodlensError, match="already holds"):  # the earlier one is not silently replaced
        preflight(out, kind="report")
    assert (out / "result.txt").read_text() == "first" and beside(out) == ["system-tmp"]


def test_a_writer_may_wait_for_the_lock(tmp_path):
    out = tmp_path / "out"
    first = preflight(out, kind="report")
    threading.Timer(0.3, first.close).start()
    with preflight(out, kind="report", wait_s=10) as second:
        second.commit(fill_with("second"))
    assert (out / "result.txt").read_text() == "second"


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_final_swap_refuses_a_folder_that_appeared_after_preflight(tmp_path, overwrite):
    out = tmp_path / "out"
    writer = preflight(out, kind="report", overwrite=overwrite)
    out.mkdir()  # another program writes there meanwhile, without asking for the lock
    (out / "ideas.txt").write_text("mine")
    with pytest.raises(OodlensError, match="the finished report is kept at") as caught:
        writer.commit(fill_with("new"))
    kept = Path(str(caught.value).split("kept at ")[1].split(":")[0])
    assert (out / "ideas.txt").read_text() == "mine"
    assert kept.name.startswith("out.kept-") and (kept / "result.txt").read_text() == "new"
    assert is_oodlens_folder(kept, "report") and beside(out) == sorted([kept.name, "system-tmp"])


def test_the_final_swap_replaces_an_oodlens_folder_that_appeared_only_with_overwrite(tmp_path):
    asked, unasked = tmp_path / "asked", tmp_path / "unasked"
    writers = [preflight(asked, kind="report", overwrite=True), preflight(unasked, kind="report")]
    for folder in (asked, unasked):
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps({"kind": "report"}))  # an older oodlens, without the lock
        (folder / "result.txt").write_text("rival")
    writers[0].commit(fill_with("new"))
    assert (asked / "result.txt").read_text() == "new"
    with pytest.raises(OodlensError, match="already holds an oodlens report"):
        writers[1].commit(fill_with("new"))
    assert (unasked / "result.txt").read_text() == "rival"


def test_the_final_swap_refuses_a_file_that_appeared_after_preflight(tmp_path):
    out = tmp_path / "out"
    writer = preflight(out, kind="report", overwrite=True)
    out.write_text("precious")
    with pytest.raises(OodlensError, match="is a file"):
        writer.commit(fill_with("new"))
    assert out.read_text() == "precious"


# --- Folders: crashes ---------------------------------------------------------------------------------------


@pytest.fixture(params=["exchange", "renames"])
def swap(request, monkeypatch) -> list[str]:
    """Run a test with the atomic exchange and again with the two-rename fallback; records exchanges done."""
    done: list[str] = []
    if request.param == "exchange":
        if folders._flagged_rename() is None:
            pytest.skip("this system has no rename with flags")
        rename_with = folders._rename_with

        def recording(how, source, destination):
            done.append(how)
            return rename_with(how, source, destination)

        monkeypatch.setattr(folders, "_rename_with", recording)
    else:
        monkeypatch.setattr(folders, "_rename_with", lambda how, source, destination: False)
    return done


def test_both_swaps_replace_the_folder_and_leave_nothing_behind(tmp_path, swap):
    out = oodlens_folder(tmp_path / "out")
    swap.clear()
    write_folder(out, fill_with("new"), kind="report", overwrite=True)
    assert (out / "result.txt").read_text() == "new" and beside(out) == ["system-tmp"]
    assert swap in ([], ["exchange"])  # [] where the fallback ran


def leftover(target: Path, tag: str, pid: int, id_: str, text: str, marker_id: str | None) -> Path:
    """A folder ``.NAME.TAG-PID-ID`` as a writer leaves it, holding ``text``; whole if ``marker_id`` is ID."""
    folder = target.parent / f".{target.name}.{tag}-{pid}-{id_}"
    folder.mkdir()
    (folder / "result.txt").write_text(text)
    if marker_id is not None:
        (folder / MARKER).write_text(json.dumps({"kind": "report", "id": marker_id}))
    return folder


def test_recover_puts_the_old_folder_back_after_a_death_between_the_renames(tmp_path, dead_pid):
    out = tmp_path / "out"
    leftover(out, "old", dead_pid, "aaaa", "earlier", "1111")
    with pytest.warns(UserWarning, match="put the previous folder back"):
        recover(out)
    assert (out / "result.txt").read_text() == "earlier" and beside(out) == ["system-tmp"]


def test_recover_finishes_the_swap_when_the_new_folder_is_whole(tmp_path, dead_pid):
    out = tmp_path / "out"
    leftover(out, "old", dead_pid, "aaaa", "earlier", "1111")
    leftover(out, "partial", dead_pid, "aaaa", "new", "aaaa")
    with pytest.warns(UserWarning, match="finished its swap"):
        recover(out)
    assert (out / "result.txt").read_text() == "new" and beside(out) == ["system-tmp"]


def test_recover_removes_what_dead_writers_left_and_keeps_whole_work(tmp_path, dead_pid):
    out = oodlens_folder(tmp_path / "out", "current")
    leftover(out, "partial", dead_pid, "aaaa", "half", None)  # killed while filling
    leftover(out, "partial", dead_pid, "bbbb", "replaced", "9999")  # killed after an exchange
    leftover(out, "old", dead_pid, "cccc", "replaced", "9999")  # killed after the second rename
    leftover(out, "partial", dead_pid, "dddd", "finished", "dddd")  # killed just before its swap
    with pytest.warns(UserWarning, match="out.kept-dddd"):
        recover(out)
    assert (out / "result.txt").read_text() == "current"
    assert (tmp_path / "out.kept-dddd" / "result.txt").read_text() == "finished"
    assert beside(out) == ["out.kept-dddd", "system-tmp"]


def test_recover_leaves_living_writers_alone(tmp_path):
    out = tmp_path / "out"
    living = subprocess.Popen(["sleep", "60"])
    try:
        staging = leftover(out, "partial", living.pid, "aaaa", "half", None)
        old = leftover(out, "old", living.pid, "bbbb", "earlier", "1111")
        recover(out)
        assert staging.is_dir() and old.is_dir() and not out.exists()
    finally:
        living.kill()
        living.wait()


def test_recover_leaves_a_locked_target_alone_and_touches_nothing_when_clean(tmp_path, dead_pid, monkeypatch):
    out = tmp_path / "out"
    old = leftover(out, "old", dead_pid, "aaaa", "earlier", "1111")
    lock = folders._Lock(out, wait_s=0)  # a writer at work: it will leave a whole folder itself
    try:
        recover(out)
        assert old.is_dir() and not out.exists()
    finally:
        lock.release()
    assert beside(out) == [old.name, "system-tmp"]  # the lock file went with the lock
    shutil.rmtree(old)
    monkeypatch.setattr(folders, "_Lock", None)  # with nothing to repair, recover does not even lock
    recover(out)
    assert beside(out) == ["system-tmp"]


def test_the_next_writer_repairs_before_it_writes(tmp_path, dead_pid):
    out = tmp_path / "out"
    leftover(out, "old", dead_pid, "aaaa", "earlier", "1111")
    leftover(out, "partial", dead_pid, "bbbb", "half", None)
    with pytest.warns(UserWarning, match="put the previous folder back"):
        with pytest.raises(OodlensError, match="already holds"):  # the restored folder is protected again
            write_folder(out, fill_with("new"), kind="report")
    assert (out / "result.txt").read_text() == "earlier" and beside(out) == ["system-tmp"]


def test_a_write_interrupted_in_this_process_is_repaired_by_its_next_writer(tmp_path):
    out = tmp_path / "out"
    leftover(out, "old", os.getpid(), "aaaa", "earlier", "1111")  # e.g. ^C between the two renames
    with pytest.warns(UserWarning, match="put the previous folder back"):
        write_folder(out, fill_with("new"), kind="report", overwrite=True)
    assert (out / "result.txt").read_text() == "new" and beside(out) == ["system-tmp"]


CHILD = f"""
import os, sys, time, types
package = types.ModuleType("oodlens")  # skip oodlens/__init__ (it loads torch): storage starts in a blink
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["oodlens"] = package
from oodlens.storage import folders
target, ready, moment = sys.argv[1:]

def pause():
    open(ready, "w").close()
    time.sleep(60)

def fill(folder):
    (folder / "result.txt").write_text("new")
    if moment == "fill":
        pause()

if moment == "swap":  # the two-rename swap, killed between its renames
    folders._rename_with = lambda how, source, destination: False
    rename = os.rename
    def rename_then_pause(source, destination):
        rename(source, destination)
        if ".old-" in str(destination):
            pause()
    os.rename = rename_then_pause
folders.write_folder(target, fill, kind="report", overwrite=True)
"""


def kill_midway(target: Path, moment: str) -> int:
    """Start a process that writes ``target``, SIGKILL it at ``moment``; returns its PID."""
    ready = target.parent / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(ready), moment])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, "the writer ended before the moment to kill it"
            assert time.monotonic() < deadline, "the writer never reached the moment to kill it"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ready.unlink()
    assert child.returncode == -signal.SIGKILL
    return child.pid


def test_a_writer_killed_while_filling_loses_nothing(tmp_path):
    out = oodlens_folder(tmp_path / "out")
    pid = kill_midway(out, "fill")
    assert (out / "result.txt").read_text() == "earlier"
    assert any(name.startswith(f".out.partial-{pid}-") for name in beside(out))
    write_folder(out, fill_with("next"), kind="report", overwrite=True)  # the lock died with the writer
    assert (out / "result.txt").read_text() == "next" and beside(out) == ["system-tmp"]


def test_a_writer_killed_between_the_two_renames_is_recovered(tmp_path):
    out = oodlens_folder(tmp_path / "out")
    pid = kill_midway(out, "swap")
    assert not out.exists()
    assert {name.split("-")[0] for name in beside(out)} >= {".out.old", ".out.partial", ".out.lock"}
    assert all(str(pid) in name for name in beside(out) if name.startswith(".out.") and name != ".out.lock")
    with pytest.warns(UserWarning, match="finished its swap"):
        recover(out)
    assert (out / "result.txt").read_text() == "new" and beside(out) == ["system-tmp"]


# --- Folders: bad locations fail before the work, failed writes keep the work -------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_preflight_refuses_proc(tmp_path):
    with pytest.raises(OodlensError, match="cannot (write in|create) /proc"):
        preflight("/proc/oodlens-out", kind="report")


def test_preflight_refuses_a_path_under_a_file_and_creates_nothing(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OodlensError, match="file.txt is a file, so nothing can be written under it"):
        preflight(tmp_path / "file.txt" / "deeper" / "out", kind="report")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt", "system-tmp"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_preflight_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OodlensError, match="cannot write in"):
            preflight(locked / "out", kind="report")
    finally:
        locked.chmod(0o755)


def test_preflight_refuses_a_disk_without_the_space_asked_for(tmp_path):
    with pytest.raises(OodlensError, match="GiB needed"):
        preflight(tmp_path / "out", kind="report", need_bytes=2**60)
    assert beside(tmp_path / "out") == ["system-tmp"]


def test_preflight_creates_the_staging_folder_and_gives_it_back_on_error(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(RuntimeError, match="the computation failed"):
        with preflight(out, kind="report") as writer:
            assert writer.staging.is_dir() and writer.staging.name.startswith(f".out.partial-{os.getpid()}-")
            assert list(writer.staging.iterdir()) == []  # the test file is gone
            raise RuntimeError("the computation failed")
    assert list(out.parent.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.commit(fill_with("late"))


def flaky_fill(failures: int):
    """A fill that fails with a full disk ``failures`` times, then writes; counts its calls."""
    calls = []

    def fill(folder: Path) -> None:
        calls.append(folder)
        if len(calls) <= failures:
            raise OSError(errno.ENOSPC, "No space left on device")
        (folder / "result.txt").write_text("hours of work")

    return fill, calls


def test_a_full_disk_at_the_end_keeps_the_work_under_the_temporary_folder(tmp_path, spare_root):
    out = oodlens_folder(tmp_path / "out")
    fill, calls = flaky_fill(failures=1)
    with pytest.raises(OodlensError, match="No space left on device.*saved whole at") as caught:
        write_folder(out, fill, kind="report", overwrite=True)
    spare = calls[1]
    assert str(spare) in str(caught.value) and spare.parent == spare_root and "\n" not in str(caught.value)
    assert (spare / "result.txt").read_text() == "hours of work" and is_oodlens_folder(spare, "report")
    assert (out / "result.txt").read_text() == "earlier" and beside(out) == ["system-tmp"]


def test_a_failed_write_says_so_when_nothing_could_be_kept(tmp_path, spare_root):
    fill, calls = flaky_fill(failures=2)
    with pytest.raises(OodlensError, match="nor under"):
        write_folder(tmp_path / "out", fill, kind="report")
    fill, calls = flaky_fill(failures=1)
    with pytest.raises(OodlensError, match=r"No space left on device\): fix that"):
        write_folder(tmp_path / "out", fill, kind="report", temp_fallback=False)
    assert len(calls) == 1 and list(spare_root.iterdir()) == [] and beside(tmp_path / "out") == ["system-tmp"]


def test_a_failed_swap_keeps_the_finished_folder_beside_the_target(tmp_path, monkeypatch):
    def broken(staging, target, id_):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(folders, "_install", broken)
    with pytest.raises(OodlensError, match="Input/output error.*kept at .*out.kept-"):
        write_folder(tmp_path / "out", fill_with("new"), kind="report")
    (kept,) = tmp_path.glob("out.kept-*")
    assert (kept / "result.txt").read_text() == "new"


def test_an_error_in_fill_is_passed_on_and_leaves_nothing(tmp_path):
    def fill(folder: Path) -> None:
        raise ValueError("a bug")

    out = oodlens_folder(tmp_path / "out")
    with pytest.raises(ValueError, match="a bug"):
        write_folder(out, fill, kind="report", overwrite=True)
    assert (out / "result.txt").read_text() == "earlier" and beside(out) == ["system-tmp"]


def test_a_folder_written_inside_a_folder_being_written_leaves_no_lock_inside(tmp_path):
    def fill(folder: Path) -> None:
        write_folder(folder / "diagnosis" / "vanilla", fill_with("inner"), kind="diagnosis")

    out = write_folder(tmp_path / "out", fill, kind="report")
    assert sorted(path.name for path in out.rglob("*")) == [
        MARKER,
        MARKER,
        "diagnosis",
        "result.txt",
        "vanilla",
    ]
    assert is_oodlens_folder(out / "diagnosis" / "vanilla", "diagnosis")


# --- Files --------------------------------------------------------------------------------------------------


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "figure.pdf"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.suffix == ".pdf"
        assert temporary.name.startswith(f".figure.pdf.tmp-{os.getpid()}-")
        temporary.write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("savefig failed")
    assert target.read_text() == "first" and beside(target) == []
    with atomic_path(target) as one, atomic_path(target) as two:
        assert one != two
        one.write_text("one")
        two.write_text("two")
    assert target.read_text() == "one"
    with pytest.raises(OodlensError, match="is a folder"):
        with atomic_path(tmp_path):
            pass


def test_atomic_path_keeps_the_suffix_for_writers_that_add_one(tmp_path):
    target = tmp_path / "array.npy"
    with atomic_path(target) as temporary:
        np.save(temporary, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2] and beside(target) == ["system-tmp"]


def test_atomic_path_removes_temporary_files_of_dead_writers(tmp_path, dead_pid):
    target = tmp_path / "table.parquet"
    stale = tmp_path / f".table.parquet.tmp-{dead_pid}-abcd1234.parquet"
    stale.write_text("half")
    own = tmp_path / f".table.parquet.tmp-{os.getpid()}-abcd1234.parquet"
    own.write_text("in use")
    atomic_write_text(target, "whole")
    assert not stale.exists() and own.exists()


def test_atomic_writes_and_json(tmp_path):
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "a.txt", "héllo").read_bytes() == "héllo".encode()
    value = {
        "nan": float("nan"),
        "inf": -np.inf,
        "scalar": np.float32(1.5),
        "count": np.int64(4),
        "pair": (1, 2),
        3: np.array([1.0, np.inf]),
        "nested": [{"flag": np.bool_(True)}],
    }
    path = write_json(tmp_path / "summary.json", value)
    assert json.loads(path.read_text()) == {
        "nan": None,
        "inf": None,
        "scalar": 1.5,
        "count": 4,
        "pair": [1, 2],
        "3": [1.0, None],
        "nested": [{"flag": True}],
    }


# --- Versions -----------------------------------------------------------------------------------------------


def test_runtime_versions_name_the_packages_and_the_commit():
    versions = runtime_versions()
    assert {"python", "torch", "transformers", "oodlens"} <= set(versions)
    if (PACKAGE.parent / ".git").exists() and shutil.which("git"):
        assert versions["oodlens_commit"]
    assert all(isinstance(version, str) for version in versions.values())


def test_the_commit_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert files._describe(tmp_path) is None  # no .git
    (tmp_path / ".git").mkdir()
    assert files._describe(tmp_path) is None  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert files._describe(PACKAGE.parent) is None  # git is not installed
