"""Small training callbacks: a plain-text progress log, validation on the final step, the data mixture's shares."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger("jetmoe.train")


class ValidateOnLastStep(L.Callback):
    """Make the final optimizer step a validation step too, so the run ends with a fresh ``val/loss``
    and ModelCheckpoint writes ``last.ckpt`` at ``max_steps`` (Lightning otherwise validates only
    every ``val_check_interval`` batches)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True  # Lightning validates before honouring should_stop


class ProgressLog(L.Callback):
    """One log line every ``every_n_steps`` optimizer steps and after each validation (loss, lr,
    tokens/s, elapsed, ETA): readable in a terminal and in a captured log file alike."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._start_step = 0
        self._last_logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_logged or (step % self.every_n_steps and step != trainer.max_steps):
            return
        self._last_logged = step
        m = trainer.callback_metrics
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        eta = elapsed / done * (trainer.max_steps - step) if done else 0.0
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "train/lr" in m:
            parts.append(f"lr {m['train/lr']:.2e}")
        if "train/tokens_per_sec" in m:
            parts.append(f"{m['train/tokens_per_sec'] / 1e3:.1f}k tok/s")
        parts.append(f"elapsed {_hms(elapsed)} eta {_hms(eta)}")
        log.info(" | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        if not trainer.is_global_zero or trainer.sanity_checking or "val/loss" not in m:
            return
        log.info(f"step {trainer.global_step}/{trainer.max_steps} | val/loss {m['val/loss']:.4f} | val/ppl {m['val/ppl']:.2f}")


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class MixtureLog(L.Callback):
    """``data/mix/<source>``: each source's share of the windows of the last `window_batches` batches (all ranks).

    The shares are computed from the data module's mixture (a function of the batch index), so logging them costs
    no communication and is exact on every rank.
    """

    def __init__(self, window_batches: int) -> None:
        self.window_batches = window_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        data = trainer.datamodule
        end = data.train_loader.batches
        for name, share in data.mixture.shares(max(0, end - self.window_batches), end).items():
            pl_module.log(f"data/mix/{name}", share)
