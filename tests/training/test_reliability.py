"""Faults a run must survive: broken or half-written checkpoints, a full disk, non-finite losses."""

from __future__ import annotations

import errno

import lightning as L
import pytest
import torch

from jetmoe.errors import ConfigError, RunFailure
from jetmoe.training.reliability import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteError,
    NonFiniteGuard,
    read_checkpoint,
    resumable_checkpoint,
)


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((3,), float(step))}}


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), tmp_path / "last.ckpt")
    io.save_checkpoint(_checkpoint(2), tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), tmp_path / "last.ckpt")

    def disk_full(obj, path, *args, **kwargs):
        path.write_bytes(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunFailure, match="could not write checkpoint .*last.ckpt: No space left on device"):
        io.save_checkpoint(_checkpoint(2), tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("content", [b"", b"\x00garbage", None], ids=["empty", "garbage", "truncated"])
def test_corrupted_checkpoint_is_named_in_one_line(tmp_path, content):
    path = tmp_path / "last.ckpt"
    if content is None:
        torch.save(_checkpoint(1), path)
        path.write_bytes(path.read_bytes()[:-200])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"last.ckpt: unreadable or corrupted checkpoint") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_checkpoint_that_needs_code_execution_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        read_checkpoint(tmp_path / "last.ckpt")


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(4), tmp_path / "best-step4.ckpt")
    io.save_checkpoint(_checkpoint(8), tmp_path / "last.ckpt")
    assert resumable_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"torn write")
    assert resumable_checkpoint(tmp_path) == tmp_path / "best-step4.ckpt"
    (tmp_path / "best-step4.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        resumable_checkpoint(tmp_path)


class _Regression(L.LightningModule):
    """y = w·x with a NaN injected into the loss at one step."""

    def __init__(self, nan_at_step: int | None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_at_step = nan_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.global_step + 1 == self.nan_at_step:
            loss = loss * float("nan")
        self.loss_terms = {"train/loss": loss.detach(), "train/ce": loss.detach()}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(64, 4)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=8)


def _fit(module, guard, tmp_path):
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard], default_root_dir=tmp_path,
    )
    trainer.fit(module)
    return trainer


def test_nan_loss_stops_with_the_step_and_term_named(tmp_path):
    module = _Regression(nan_at_step=3)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite train/loss, train/ce; training stopped"):
        _fit(module, NonFiniteGuard("stop"), tmp_path)
    assert torch.isfinite(module.layer.weight).all()  # the bad step never reached the weights


def test_nan_loss_can_skip_the_step(tmp_path):
    module = _Regression(nan_at_step=3)
    guard = NonFiniteGuard("skip")
    trainer = _fit(module, guard, tmp_path)
    assert guard.skipped_steps == [3]
    assert trainer.global_step == 6
    assert torch.isfinite(module.layer.weight).all()


def test_guard_rejects_unknown_action():
    with pytest.raises(ConfigError, match="optim.on_nonfinite must be one of stop, skip"):
        NonFiniteGuard("ignore")
