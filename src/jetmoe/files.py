"""Crash-safe file writes: a file or directory is written under a temporary name beside its destination, flushed to
disk, then renamed over it, so a process killed (or a disk filling up) mid-write leaves the previous version intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, fsync it, rename it over `path` and fsync the
    directory. The temporary file is removed if anything fails."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
