"""Crash-safe file writes: a file or directory is written under a temporary name beside its destination, flushed to
disk, then renamed over it, so a process killed (or a disk filling up) mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it): published files get 0o666 & ~umask
os.umask(_UMASK)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_file(path: str | Path) -> Path:
    """A new empty file beside `path`, named `.NAME.*.tmp` (what `remove_temporary_files` clears), for a write that
    `publish` finishes."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Finish a write: fsync the complete file `tmp`, give it the permissions of a newly created file (mkstemp
    makes it private), rename it over `path` and fsync the directory."""
    path = Path(path)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_temporary_files(directory: str | Path) -> None:
    """Clear what writes killed before `publish` left in `directory`."""
    for path in Path(directory).glob(".*.tmp"):
        path.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then `publish` it. The temporary file is removed if
    anything fails."""
    tmp = temporary_file(path)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(source: str | Path, path: str | Path) -> None:
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 1,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as indented JSON ending in a newline (`default` as in `json.dumps`: None refuses unknown types).
    Returns `path`."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")
    return Path(path)


def hidden_sibling(path: str | Path, tag: str) -> Path:
    """`.NAME.tag` beside `path`: where a directory is built (`tmp`) and where its previous version waits (`old`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}")


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete directory `tmp` to `final`, replacing it. `final`'s previous content survives as
    `.NAME.old` until the new one is in place (`resolve_dir` falls back to it)."""
    tmp, final = Path(tmp), Path(final)
    old = hidden_sibling(final, "old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dir(directory: str | Path) -> Path | None:
    """`directory`, or its `.NAME.old` backup when a `replace_dir` died between its two renames; None if neither
    exists."""
    directory = Path(directory)
    if directory.exists():
        return directory
    old = hidden_sibling(directory, "old")
    return old if old.is_dir() else None
