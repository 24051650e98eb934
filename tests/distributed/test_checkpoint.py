"""Sharded checkpoints are written atomically and found again after a crash (one process, no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy

from jetmoe import JetMoeForCausalLM
from jetmoe.distributed import consolidate, resolve_checkpoint
from jetmoe.distributed.strategy import FSDP2Strategy
from jetmoe.errors import InputFileError, MissingFileError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Died(RuntimeError):
    """Stands in for a process killed in the middle of a save."""


def test_a_crash_between_the_renames_falls_back_to_the_old_checkpoint(tmp_path):
    (tmp_path / ".last.ckpt.old").mkdir()  # replace_dir's first rename done, the second not
    assert resolve_checkpoint(tmp_path / "last.ckpt") == tmp_path / ".last.ckpt.old"
    with pytest.raises(MissingFileError, match=r"missing: no such checkpoint$"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "best.ckpt").write_bytes(b"")
    with pytest.raises(MissingFileError, match=r"no such checkpoint \(found: best.ckpt\)$"):  # a mistyped name
        resolve_checkpoint(tmp_path / "bets.ckpt")


def test_unusable_checkpoints_fail_consolidate_with_one_line_naming_the_file(tmp_path, tiny_config):
    """A single-file (non-sharded) checkpoint, and a sharded one missing or truncating a file: `jetmoe
    consolidate` prints these as one-line errors (errors.UserError), not tracebacks."""
    model = JetMoeForCausalLM(tiny_config)
    sharded = tmp_path / "checkpoints/last.ckpt"
    dcp.save({f"state_dict.model.{k}": v for k, v in model.state_dict().items()}, checkpoint_id=sharded, no_dist=True)
    consolidate(sharded, tmp_path / "hf", tiny_config)
    assert (tmp_path / "hf/model.safetensors").is_file()  # the intact checkpoint converts

    single = tmp_path / "checkpoints/best.ckpt"
    torch.save({"state_dict": {}}, single)
    with pytest.raises(InputFileError, match=f"best.ckpt: a single-file checkpoint.* already in {tmp_path}/hf$"):
        consolidate(single, tmp_path / "out", tiny_config)

    [shard] = sharded.glob("*.distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"last.ckpt: a shard file \(\*.distcp\) cannot be read \(PytorchStream"):
        consolidate(sharded, tmp_path / "out", tiny_config)
    shard.unlink()
    with pytest.raises(MissingFileError, match=f"{shard.name}: shard file not found"):
        consolidate(sharded, tmp_path / "out", tiny_config)

    metadata = sharded / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:10])
    with pytest.raises(InputFileError, match=r"last.ckpt/.metadata: not a readable checkpoint index"):
        consolidate(sharded, tmp_path / "out", tiny_config)
    metadata.unlink()
    with pytest.raises(MissingFileError, match=r"last.ckpt/.metadata: not found \(expected a sharded checkpoint"):
        consolidate(sharded, tmp_path / "out", tiny_config)


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
