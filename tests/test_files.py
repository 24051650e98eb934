"""Crash-safe writes: a write that dies leaves the previous file or directory intact."""

import pytest

from jetmoe.files import atomic_write, atomic_write_text, replace_dir, resolve_dir


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
