"""Crash-safe writes: a write that dies leaves the previous file or directory intact."""

import json
import os
import stat

import pytest

from jetmoe.files import (
    atomic_write, atomic_write_json, atomic_write_text, remove_temporary_files, replace_dir, resolve_dir,
)


class Died(RuntimeError):
    """Stands in for a process killed in the middle of a write."""


def test_a_write_that_dies_leaves_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "first")

    def write_then_die(tmp):
        tmp.write_text("half")
        raise Died

    with pytest.raises(Died):
        atomic_write(target, write_then_die)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind
    atomic_write_text(target, "second")
    assert target.read_text() == "second"


def test_replace_dir_swaps_in_a_complete_directory(tmp_path):
    final, tmp = tmp_path / "store", tmp_path / ".store.tmp"
    for content in ("one", "two"):
        tmp.mkdir()
        (tmp / "data").write_text(content)
        replace_dir(tmp, final)
        assert (final / "data").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_resolve_dir_falls_back_to_the_previous_version(tmp_path):
    final = tmp_path / "store"
    assert resolve_dir(final) is None
    (tmp_path / ".store.old").mkdir()  # replace_dir died between its two renames
    assert resolve_dir(final) == tmp_path / ".store.old"
    final.mkdir()
    assert resolve_dir(final) == final


def test_published_files_are_readable_like_new_files_and_json_ends_with_a_newline(tmp_path):
    """mkstemp makes a private file: publishing gives it the mode `open` would (0o666 less the umask), so a store or
    an export is readable by the other users of a shared filesystem."""
    umask = os.umask(0o022)
    os.umask(umask)
    target = atomic_write_json(tmp_path / "record.json", {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]} and target.read_text().endswith("]\n}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    (tmp_path / ".shard.bin.abc.tmp").write_bytes(b"half")  # a write killed before publish
    remove_temporary_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
