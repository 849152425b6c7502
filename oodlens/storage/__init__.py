"""The one place that writes files and folders: atomically, and never over something oodlens did not write.

Files (:mod:`.files`: :func:`atomic_path`, :func:`atomic_write_bytes`, :func:`atomic_write_text`,
:func:`write_json`) are written under a hidden temporary name beside the target and renamed into place, so a
reader never sees half a file. Folders (:mod:`.folders`: :func:`preflight` then :meth:`FolderWriter.commit`,
or :func:`write_folder` for both) are staged, locked, marked as oodlens' own and swapped in; what a killed
writer left is repaired by the next one (:func:`recover`)."""

from .files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    git_commit,
    json_ready,
    runtime_versions,
    write_json,
)
from .folders import (
    MARKER,
    FolderWriter,
    check_replaceable,
    folder_kind,
    is_oodlens_folder,
    preflight,
    recover,
    write_folder,
)

__all__ = [
    "MARKER",
    "FolderWriter",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_replaceable",
    "folder_kind",
    "git_commit",
    "is_oodlens_folder",
    "json_ready",
    "preflight",
    "recover",
    "runtime_versions",
    "write_folder",
    "write_json",
]
