"""DownstreamEvalCallback in a Lightning fit: when it evaluates, what it logs and writes, resume, bad task files."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from jetmoe import JetMoeForCausalLM
from jetmoe.errors import InputFileError, MissingFileError
from jetmoe.eval.callback import DOWNSTREAM_JSON, DownstreamEvalCallback, build_downstream_callback
from jetmoe.eval.config import DownstreamConfig
from jetmoe.eval.tasks import TaskConfig
from jetmoe.eval.scoring import score_task


class TinyLM(L.LightningModule):
    def __init__(self, model: JetMoeForCausalLM):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(tmp_path: Path, callback, model, max_steps: int, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=[callback], log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **trainer_kwargs,
    )
    data = DataLoader(TensorDataset(torch.randint(3, model.config.vocab_size, (64, 16))), batch_size=4)
    trainer.fit(TinyLM(model), data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def fresh_model(model) -> JetMoeForCausalLM:
    copy = JetMoeForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


def test_evaluates_at_start_every_n_steps_and_at_the_end(tmp_path, fresh_model, tokenizer, encode, task):
    callback = DownstreamEvalCallback([task], every_n_steps=3, tokenizer=tokenizer, output_dir=tmp_path)
    start = score_task(fresh_model, task, encode, eos_token_id=2)
    fit(tmp_path, callback, fresh_model, max_steps=7, accumulate_grad_batches=2)
    assert [entry["step"] for entry in callback.history] == [0, 3, 6, 7]
    assert callback.history[0]["tasks"]["mini"]["acc"] == start["acc"]  # step 0: the initial weights
    final = score_task(fresh_model, task, encode, eos_token_id=2)
    assert callback.history[-1]["tasks"]["mini"]["acc_norm"] == final["acc_norm"]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("downstream/mini/acc")] == [0, 3, 6, 7]
    assert [e.value for e in events.Scalars("downstream/mini/acc_norm")] == pytest.approx(
        [entry["tasks"]["mini"]["acc_norm"] for entry in callback.history])
    written = json.loads((tmp_path / DOWNSTREAM_JSON).read_text())
    assert written["history"] == callback.history
    assert written["tasks"]["mini"]["items"] == len(task.items)
    assert not list(tmp_path.glob("*.tmp"))  # written through jetmoe.files: nothing left beside it


def test_history_survives_a_resume(tmp_path, fresh_model, tokenizer, task):
    first = DownstreamEvalCallback([task], every_n_steps=2, tokenizer=tokenizer, output_dir=tmp_path)
    trainer = fit(tmp_path, first, fresh_model, max_steps=3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    second = DownstreamEvalCallback([task], every_n_steps=2, tokenizer=tokenizer, output_dir=tmp_path)
    fit(tmp_path, second, fresh_model, max_steps=5, ckpt_path=tmp_path / "mid.ckpt")
    assert [entry["step"] for entry in second.history] == [0, 2, 3, 4, 5]  # no second step-0 evaluation


def test_build_reads_task_files_before_training(tmp_path):
    assert build_downstream_callback(DownstreamConfig(every_n_steps=0), tmp_path) is None
    with pytest.raises(MissingFileError, match=r"downstream task 'mine': .*missing.jsonl: file not found"):
        build_downstream_callback(DownstreamConfig(tasks=[TaskConfig(name="mine", path=str(tmp_path / "missing.jsonl"))]),
                                  tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 5}\n')
    with pytest.raises(InputFileError, match=r"bad.jsonl:1: 'label' 5 is outside the 2 choices"):
        build_downstream_callback(DownstreamConfig(tasks=[TaskConfig(name="mine", path=str(bad))]), tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_single_process_numbers(tmp_path, fresh_model, tokenizer, encode, task):
    """ddp_spawn on two CPU processes: each rank scores half the items, the counts are summed."""
    expected = score_task(fresh_model, task, encode, eos_token_id=2)
    callback = DownstreamEvalCallback([task], every_n_steps=5, tokenizer=tokenizer, output_dir=tmp_path)
    fit(tmp_path, callback, fresh_model, max_steps=1, devices=2, strategy="ddp_spawn")
    step0 = json.loads((tmp_path / DOWNSTREAM_JSON).read_text())["history"][0]["tasks"]["mini"]
    assert (step0["acc"], step0["acc_norm"]) == (expected["acc"], expected["acc_norm"])
