"""Sharded checkpoints are written atomically and found again after a crash (one process, no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from jetmoe.distributed import resolve_checkpoint
from jetmoe.distributed.strategy import FSDP2Strategy
from jetmoe.errors import MissingFileError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Died(RuntimeError):
    """Stands in for a process killed in the middle of a save."""


def test_a_crash_between_the_renames_falls_back_to_the_old_checkpoint(tmp_path):
    (tmp_path / ".last.ckpt.old").mkdir()  # replace_dir's first rename done, the second not
    assert resolve_checkpoint(tmp_path / "last.ckpt") == tmp_path / ".last.ckpt.old"
    with pytest.raises(MissingFileError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing")


def test_lightning_strategy_save_is_atomic(tmp_path, monkeypatch):
    """FSDP2Strategy writes Lightning's sharded checkpoint beside the target and renames it into place."""
    target = tmp_path / "last.ckpt"

    def fake_save(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir()
        (Path(filepath) / "meta.pt").write_text(str(checkpoint["step"]))
        if checkpoint["step"] == 3:
            raise Died

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", fake_save)
    strategy = FSDP2Strategy()
    strategy.save_checkpoint({"step": 1}, target)
    strategy.save_checkpoint({"step": 2}, target)
    assert (target / "meta.pt").read_text() == "2"
    with pytest.raises(Died):
        strategy.save_checkpoint({"step": 3}, target)
    assert (target / "meta.pt").read_text() == "2"
    strategy.save_checkpoint({"step": 4}, target)
    assert (target / "meta.pt").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
