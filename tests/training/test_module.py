"""JetMoeLitModule in-process: it overfits a fixed batch, returns what the expert callback reads,
and computes a token-weighted validation loss."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from jetmoe.training.config import load_config
from jetmoe.training.module import JetMoeLitModule

REPO = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    return load_config(
        REPO / "experiments/default.yaml",
        ["model=tiny", "data.seq_len=16", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
         "trainer.max_steps=30", *overrides],
    )


def _batch(batch_size: int = 4, seq_len: int = 16, vocab: int = 512) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch_size, seq_len))
    positions = torch.arange(seq_len).repeat(batch_size, 1)
    positions[:, 8:] -= 8  # a second document starts mid-window
    return {"input_ids": ids, "labels": ids, "position_ids": positions}


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.outputs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.outputs.append(outputs)


def _trainer(max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )


@pytest.mark.parametrize("intra_doc_mask", [False, True])
def test_overfits_a_fixed_batch(intra_doc_mask):
    module = JetMoeLitModule(_cfg(f"data.intra_doc_mask={intra_doc_mask}"))
    batch = _batch()
    recorder = Recorder()
    _trainer(30, [recorder]).fit(module, train_dataloaders=DataLoader([batch] * 30, batch_size=None))
    assert len(recorder.losses) == 30
    assert recorder.losses[-1] < 0.5 * recorder.losses[0]
    assert module.tokens_seen == 30 * batch["input_ids"].numel()


def test_training_step_returns_detached_routings_for_the_expert_callback():
    cfg = _cfg("trainer.max_steps=1")
    module = JetMoeLitModule(cfg)
    recorder = Recorder()
    _trainer(1, [recorder]).fit(module, train_dataloaders=DataLoader([_batch()], batch_size=None))
    (out,) = recorder.outputs
    assert set(out) == {"loss", "routings", "token_mask"} and out["token_mask"] is None
    assert len(out["routings"]) == 2 * cfg.model.num_hidden_layers
    for routing in out["routings"]:
        assert routing.logits_NE.shape == (4 * 16, cfg.model.num_local_experts) and not routing.logits_NE.requires_grad
        assert "probs_NE" in routing.__dict__  # computed once, for the load-balancing loss, and shared


def test_validation_loss_is_the_token_weighted_mean_ce():
    module = JetMoeLitModule(_cfg())
    module.configure_model()
    batches = [_batch(batch_size=3), _batch(batch_size=1)]
    with torch.no_grad():
        module.model.eval()
        ces = [float(module(b).ce_loss) for b in batches]
    expected = (3 * ces[0] + 1 * ces[1]) / 4  # every row scores seq_len - 1 tokens
    (metrics,) = _trainer(1).validate(module, DataLoader(batches, batch_size=None), verbose=False)
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_checkpoint_restores_config_and_tokens_seen(tmp_path):
    cfg = _cfg("trainer.max_steps=2")
    module = JetMoeLitModule(cfg)
    trainer = _trainer(2)
    trainer.fit(module, train_dataloaders=DataLoader([_batch()] * 2, batch_size=None))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    restored = JetMoeLitModule.load_from_checkpoint(tmp_path / "c.ckpt")
    assert restored.cfg == cfg
    assert restored.tokens_seen == module.tokens_seen == 2 * 4 * 16
    torch.testing.assert_close(restored.model.state_dict(), module.model.state_dict())
