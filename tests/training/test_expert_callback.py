import csv
import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jetmoe.training.expert_callback import (
    CSV_SUMMARY_KEYS,
    EXPERT_KEYS,
    ExpertUtilizationCallback,
    bias_metrics,
    expert_histogram,
    format_report,
    imbalance_image,
    load_bar,
    load_heatmap,
    scalar_metrics,
    write_report,
)
from jetmoe.training.expert_metrics import RouterUtilization
from model_helpers import routes

NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS = 2, 4, 2, 24


class FakeRouterModule(L.LightningModule):
    """Returns random routings in the dict format the callback expects (no real model)."""

    def __init__(self, with_routings=True):
        super().__init__()
        self.proj = nn.Linear(3, NUM_EXPERTS)
        self.with_routings = with_routings

    def _step(self, batch):
        logits_NE = self.proj(batch[0].reshape(TOKENS, 3))
        out = {"loss": logits_NE.square().mean()}
        if self.with_routings:
            noisy = [logits_NE.detach() + torch.randn_like(logits_NE) for _ in range(2 * NUM_LAYERS)]
            out["routings"] = routes(noisy, TOP_K)
            out["token_mask"] = torch.arange(TOKENS) < TOKENS - 4
        return out

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(num_batches):
    return DataLoader(TensorDataset(torch.randn(num_batches, TOKENS, 3)), batch_size=1)


def fit(tmp_path, module, callback, max_steps=6, ckpt_path=None, log_every_n_steps=2, **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[callback],
        log_every_n_steps=log_every_n_steps,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, loader(8), loader(2), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("expert_run")
    callback = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=4, heatmap_every_n_steps=4)
    # 12 batches, 6 optimizer steps: one logged window (steps 1-4), a final partial one (steps 5-6)
    trainer = fit(tmp_path, FakeRouterModule(), callback, accumulate_grad_batches=2)
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return trainer, events


def test_logs_scalars_once_per_interval(trained_run):
    _, events = trained_run
    scalars = events.Tags()["scalars"]
    for kind in ("moa", "moe"):
        for metric in ("imbalance", "cv", "entropy_norm", "dead_fraction", "top1_top2_ratio"):
            assert f"experts/{kind}/layer_1/{metric}" in scalars
            assert f"val_experts/{kind}/layer_0/{metric}" in scalars
        for summary in ("mean_imbalance", "max_imbalance", "mean_entropy_norm", "dead_fraction"):
            assert f"experts/{kind}/{summary}" in scalars
            assert f"val_experts/{kind}/{summary}" in scalars
    # once, although two batches end with global_step == 4
    assert len(events.Scalars("experts/moe/mean_imbalance")) == 1


def test_logs_heatmap_images_and_histograms(trained_run):
    _, events = trained_run
    tags = events.Tags()
    assert "experts/load_heatmap" in tags["images"]
    [image] = events.Images("experts/load_heatmap")
    assert image.step == 4 and image.width > 600 and image.height > 200  # a labelled figure, not 8-pixel squares
    assert "experts/imbalance_over_time" not in tags["images"]  # one window so far: no curve yet
    assert "experts/moe/layer_1/expert_tokens" in tags["histograms"]


def test_writes_json_and_csv(trained_run):
    trainer, _ = trained_run
    with open(f"{trainer.log_dir}/expert_utilization.json") as f:
        report = json.load(f)
    assert report["scopes"] == ["window", "run", "val"]
    assert [r["name"] for r in report["routers"]] == ["moa/layer_0", "moe/layer_0", "moa/layer_1", "moe/layer_1"]
    run, window = report["routers"][0]["run"], report["routers"][0]["window"]
    assert run["num_tokens"] == 12 * (TOKENS - 4)  # masked tokens excluded
    assert window["num_tokens"] == 4 * (TOKENS - 4)
    assert sum(run["tokens"]) == TOP_K * run["num_tokens"]
    assert sum(run["load"]) == pytest.approx(1.0)
    with open(f"{trainer.log_dir}/expert_utilization.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * NUM_LAYERS * NUM_EXPERTS
    assert {row["scope"] for row in rows} == {"window", "run", "val"}
    assert rows[0].keys() >= {"kind", "layer", "expert", "load", "prob", "tokens", "imbalance"}
    assert report["history"]["step"] == [4, 6]  # the logged window and the final partial one
    assert len(report["history"]["load"][0]) == 2 * NUM_LAYERS
    assert report["history"]["load"][-1] == [router["window"]["load"] for router in report["routers"]]


def test_format_report_renders_a_row_per_router(trained_run):
    trainer, _ = trained_run
    text = format_report(trainer.logger.root_dir, final_losses={"train_loss": 1.25})
    lines = text.splitlines()
    assert "train_loss=1.2500" in text
    router_rows = [line for line in lines if line.startswith(("moa ", "moe "))]
    assert len(router_rows) == 2 * NUM_LAYERS
    assert all(len(line) == len(router_rows[0]) for line in router_rows)
    assert len(format_report(trainer.log_dir, scope="val").splitlines()) == len(lines) - 1
    with pytest.raises(ValueError, match="scope"):
        format_report(trainer.log_dir, scope="test")


def test_run_total_survives_a_resume(tmp_path):
    first = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=2)
    trainer = fit(tmp_path, FakeRouterModule(), first, max_steps=3)  # ends inside an open window
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    second = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=2)
    trainer = fit(tmp_path, FakeRouterModule(), second, max_steps=6, ckpt_path=tmp_path / "mid.ckpt")
    report = json.loads((tmp_path / "run" / "version_1" / "expert_utilization.json").read_text())
    run = report["routers"][0]["run"]
    assert run["num_tokens"] == 6 * (TOKENS - 4)  # steps 1-3 from the checkpoint, 4-6 after the resume
    assert sum(run["tokens"]) == TOP_K * run["num_tokens"]
    assert report["history"]["step"] == [2, 3, 4, 6]  # steps 2 and 3 (the end of the first fit) from the checkpoint


def test_skips_outputs_without_routings(tmp_path):
    callback = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=2)
    trainer = fit(tmp_path, FakeRouterModule(with_routings=False), callback)
    assert not (tmp_path / "run" / "version_0" / "expert_utilization.json").exists()
    assert not any(key.startswith("experts/") for key in trainer.logged_metrics)
    with pytest.raises(FileNotFoundError):
        format_report(tmp_path)


def test_heatmaps_follow_the_logged_windows(tmp_path):
    with pytest.raises(ValueError, match="heatmap_every_n_steps must be >= 0"):
        ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, heatmap_every_n_steps=-1)
    # windows logged at steps 3, 6, 9, 12; heatmaps every 4 steps: the first windows at or after 4, 8, 12
    callback = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=3, heatmap_every_n_steps=4)
    trainer = fit(tmp_path, FakeRouterModule(), callback, max_steps=12, log_every_n_steps=3)
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("experts/load_heatmap")] == [6, 9, 12]
    assert [image.step for image in events.Images("experts/imbalance_over_time")] == [6, 9, 12]


def test_rejects_misaligned_intervals(tmp_path):
    callback = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=3, heatmap_every_n_steps=0)
    with pytest.raises(ValueError, match="mislabelled or overwritten"):
        fit(tmp_path, FakeRouterModule(), callback)


def test_scalar_metrics_names():
    metric = RouterUtilization(2 * NUM_LAYERS, NUM_EXPERTS, TOP_K)
    metric.update(routes([torch.randn(10, NUM_EXPERTS) for _ in range(2 * NUM_LAYERS)], TOP_K))
    scalars = scalar_metrics("experts", metric.compute())
    assert len(scalars) == 7 * 2 * NUM_LAYERS + 4 * 2
    assert all(value.ndim == 0 for value in scalars.values())
    assert {"experts/moe/layer_0/balance_loss", "experts/moa/layer_1/dropped_share"} <= set(scalars)


def test_bias_metrics_log_every_bias_and_the_spread_per_kind():
    biases_RE = torch.arange(2 * NUM_LAYERS * NUM_EXPERTS, dtype=torch.float32).view(2 * NUM_LAYERS, NUM_EXPERTS)
    scalars = bias_metrics("experts", biases_RE)
    assert len(scalars) == 2 * NUM_LAYERS * NUM_EXPERTS + 2
    assert scalars["experts/moe/layer_0/bias/expert_2"] == biases_RE[1, 2]
    assert scalars["experts/moa/mean_bias_spread"] == NUM_EXPERTS - 1


def test_heatmap_histogram_and_bar_helpers():
    load_RE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]] * NUM_LAYERS)
    image_HW3 = load_heatmap(load_RE, step=7)
    assert image_HW3.dtype == np.uint8 and image_HW3.shape[2] == 3 and image_HW3.shape[1] > image_HW3.shape[0] > 150
    assert len(np.unique(image_HW3.reshape(-1, 3), axis=0)) > 50  # text, ticks and a colour bar, not flat squares
    history = [(step, load_RE.tolist()) for step in (2, 4, 6)]
    assert imbalance_image(history).shape[2] == 3
    hist = expert_histogram(torch.tensor([3, 0, 1]))
    assert hist["num"] == 4 and hist["sum"] == 2 and hist["bucket_counts"] == [3, 0, 1]
    assert load_bar([0.5, 0.25, 0.0, 0.25]) == "█▄ ▄"


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_spawn_reports_global_counts(tmp_path):
    """Two CPU ranks: every rank joins each metric sync (no hang) and the report counts both ranks' tokens."""
    callback = ExpertUtilizationCallback(NUM_LAYERS, NUM_EXPERTS, TOP_K, log_every_n_steps=2, heatmap_every_n_steps=2)
    fit(tmp_path, FakeRouterModule(), callback, devices=2, strategy="ddp_spawn")
    report = json.loads((tmp_path / "run" / "version_0" / "expert_utilization.json").read_text())
    assert report["routers"][0]["run"]["num_tokens"] == 2 * 6 * (TOKENS - 4)  # 2 ranks x 6 steps
    assert report["routers"][0]["val"]["num_tokens"] == 2 * (TOKENS - 4)  # 2 val batches split over 2 ranks


def test_a_report_write_that_fails_keeps_the_previous_report(tmp_path):
    stats = {**{key: [0.5, 0.5] for key in EXPERT_KEYS}, **dict.fromkeys(CSV_SUMMARY_KEYS, 1.0)}
    report = {"scopes": ["run"], "routers": [{"kind": "moe", "layer": 0, "run": stats}], "num_experts": 2}
    write_report(tmp_path, report)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(KeyError):
        write_report(tmp_path, {**report, "scopes": ["run", "val"]})  # no "val" statistics: fails mid-CSV
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before  # no half file, no temporary file
