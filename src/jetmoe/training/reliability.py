"""What keeps a run's work safe: atomic, safely loaded checkpoints, resume that skips a broken checkpoint,
and a guard that stops (or skips) a step whose loss or gradients went non-finite."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from jetmoe.distributed.clip import total_norm
from jetmoe.errors import InputFileError, MissingFileError, RunFailure, check_choice
from jetmoe.files import atomic_write
from jetmoe.training.config import ON_NONFINITE

log = logging.getLogger("jetmoe.train")


class CheckpointError(InputFileError):
    """A checkpoint file that cannot be read."""


class NonFiniteError(RunFailure):
    """A loss term or the gradients became NaN/Inf and the run was configured to stop."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint without unpickling arbitrary objects (`weights_only=True`)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a corrupted pickle stream can fail in many ways; all mean "unreadable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable or corrupted checkpoint ({first_line})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same directory, fsync it, then rename it into place:
    a run killed (or a disk filling up) while writing leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        except OSError as err:
            raise RunFailure(f"could not write checkpoint {path}: {err.strerror or err}; the previous one is kept") from None

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location or "cpu")


def resumable_checkpoint(checkpoint_dir: Path, preferred: str = "last.ckpt") -> Path:
    """The newest readable checkpoint in `checkpoint_dir`, `preferred` first; broken ones are logged and skipped."""
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: (p.name != preferred, -p.stat().st_mtime))
    for path in candidates:
        if path.is_dir():  # a sharded (FSDP) checkpoint: complete once its .metadata is in place
            if (path / ".metadata").is_file():
                return path
            log.warning("%s: incomplete sharded checkpoint; trying an older one", path)
            continue
        try:
            read_checkpoint(path)
            return path
        except CheckpointError as err:
            log.warning("%s; trying an older checkpoint", err)
    raise MissingFileError(f"--resume: no readable checkpoint in {checkpoint_dir}")


class NonFiniteGuard(L.Callback):
    """Before each optimizer step, check the loss terms the module recorded and the gradient norm.

    `action="stop"` raises `NonFiniteError` naming the step and the term (the last good checkpoint stays as it
    is); `action="skip"` drops the step's gradients, so the optimizer leaves the weights unchanged.
    """

    def __init__(self, action: str = "stop") -> None:
        check_choice("optim.on_nonfinite", action, ON_NONFINITE)
        self.action = action
        self.skipped_steps: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        bad = [name for name, value in getattr(pl_module, "loss_terms", {}).items() if not _finite(value)]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not bad and grads and not _finite(total_norm(grads)):
            bad = ["gradients"]
        if not bad:
            return
        step = trainer.global_step + 1
        if self.action == "skip":
            log.warning("step %d: non-finite %s; step skipped", step, ", ".join(bad))
            self.skipped_steps.append(step)
            optimizer.zero_grad(set_to_none=True)
            return
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad)}; training stopped (the last good checkpoint is kept; "
            "lower optim.lr, or set optim.on_nonfinite=skip)"
        )


def _finite(value: torch.Tensor | float) -> bool:
    return math.isfinite(float(value))
