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


def test_an_upcycled_run_starts_where_its_dense_run_stopped(tmp_path):
    """A dense run (one expert), then an E=4, k=2 run upcycled from its directory: the first training loss is near
    the dense run's last, not the ~log V of a fresh model; at a negligible lr its validation loss is the dense one
    (the same validation windows: the invariant of `jetmoe.model.upcycle` through export, load and upcycling)."""
    from jetmoe.training.run import train

    common = [
        "model=tiny", "data.seq_len=32", "data.batch_size=8", "data.max_chars=50000",
        f"data.cache_dir={tmp_path}/cache", "optim.schedule=constant", "optim.warmup_steps=0", "trainer.val_check_interval=100",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "run.expert_metrics=false",
        "run.sample_tokens=0", f"run.output_dir={tmp_path}/runs",
    ]
    dense = train(load_config(REPO / "experiments/default.yaml", [
        *common, "run.name=dense", "trainer.max_steps=30", "optim.lr=1e-2", "model.num_local_experts=1",
        "model.num_experts_per_tok=1",
    ]))["metrics"]
    upcycled = train(load_config(REPO / "experiments/default.yaml", [
        *common, "run.name=upcycled", "trainer.max_steps=1", "optim.lr=1e-9",
        f"model.upcycle_from={tmp_path}/runs/dense",
    ]))["metrics"]
    fresh_loss = math.log(512)
    assert dense["train_loss"] < fresh_loss - 0.5  # the dense run learned something to start from
    assert abs(upcycled["train_loss"] - dense["train_loss"]) < 0.25 * (fresh_loss - dense["train_loss"])
    assert upcycled["val_loss"] == pytest.approx(dense["val_loss"], abs=1e-4)


def test_bias_balancing_moves_the_biases_by_each_optimizer_steps_load():
    """balancing=bias: after every optimizer step (two micro-batches here), each router's biases move by
    rate · sign(mean load − load) of the rows routed in that step's micro-batches; the loss is sequence-wise."""
    rate = 0.01
    module = JetMoeLitModule(_cfg("model.balancing=bias", f"model.bias_update_rate={rate}",
                                  "trainer.accumulate_grad_batches=2"))
    biases = []

    class BiasRecorder(Recorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            biases.append(torch.stack([r.expert_bias.clone() for r in pl_module.model.routers()]))

    recorder = BiasRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=DataLoader([_batch() for _ in range(6)], batch_size=None))
    previous = torch.zeros_like(biases[0])
    for step in range(3):
        first, second = (recorder.outputs[2 * step + i]["routings"] for i in range(2))
        load_RE = torch.stack([a.counts_E + b.counts_E for a, b in zip(first, second)]).float()
        expected = previous + rate * torch.sign(load_RE.mean(-1, keepdim=True) - load_RE)
        assert torch.equal(biases[2 * step], previous)  # not moved after the first micro-batch
        torch.testing.assert_close(biases[2 * step + 1], expected)
        previous = expected
    assert previous.abs().sum() > 0
