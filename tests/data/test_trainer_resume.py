"""Exact mid-epoch resume with a real Lightning Trainer (the fit loop checkpoints the stateful train loader)."""

import dataclasses

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from jetmoe.data.config import PhaseConfig
from jetmoe.data.datamodule import JetMoeDataModule


class BatchRecorder(L.LightningModule):
    """A one-weight model that remembers every batch it trained on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(datamodule, tmp_path, ckpt_path=None) -> list[torch.Tensor]:
    model = BatchRecorder()
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", devices=1, use_distributed_sampler=False, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.seen


def test_resume_from_step_3_replays_exactly_batches_4_to_6(jsonl_config, tmp_path):
    cfg = dataclasses.replace(jsonl_config, batch_size=50)  # ~4 batches per epoch
    dm = JetMoeDataModule(cfg, vocab_size=320)
    full = fit(dm, tmp_path)
    batches_per_epoch = len(dm.train_dataloader())
    assert len(full) == 6 and 3 < batches_per_epoch < 6  # the resumed part crosses into epoch 1

    step3 = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = fit(JetMoeDataModule(cfg, vocab_size=320), tmp_path / "resumed", ckpt_path=step3)

    assert len(resumed) == 3
    for got, expected in zip(resumed, full[3:]):
        assert torch.equal(got, expected)
    assert not torch.equal(full[0], full[batches_per_epoch])  # epoch 1 is reshuffled, not a replay


def test_resume_across_a_phase_switch_replays_exactly(two_source_config, tmp_path):
    cfg = dataclasses.replace(two_source_config, phases=[PhaseConfig(start=4, weights={"code": 1.0})])
    full = fit(JetMoeDataModule(cfg, vocab_size=320), tmp_path)
    step3 = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = fit(JetMoeDataModule(cfg, vocab_size=320), tmp_path / "resumed", ckpt_path=step3)
    assert len(resumed) == 3 and all(torch.equal(got, expected) for got, expected in zip(resumed, full[3:]))
    assert not torch.equal(full[2], full[3])
