"""A run directory's model card: the run's config, final metrics, last downstream evaluation and latest lm-eval
results per task; figures only for what the run has data for."""

from __future__ import annotations

import json

import pytest

from jetmoe.training.report import latest_lm_eval_results, model_card, write_figures


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "data:\n  sources:\n    web:\n      kind: hub\n      hub_name: org/corpus\n  seq_len: 64\n  batch_size: 4\n"
        "optim:\n  lr: 0.001\n  schedule: wsd\n  warmup_steps: 10\n  weight_decay: 0.1\n"
        "trainer:\n  precision: bf16-mixed\n  accumulate_grad_batches: 2\nrun:\n  name: demo\n"
    )
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"step": 50, "tokens_seen": 25600, "train_loss": 3.21, "val_loss": 3.5, "val_ppl": 33.1, "wall_time_s": 75.2,
         "tokens_per_sec": 340.6}))
    history = [{"step": s, "seconds": 0.1, "tasks": {"t": {"acc": a, "acc_norm": a, "items": 8, "chance": 0.25}}}
               for s, a in ((0, 0.25), (50, 0.5))]
    (tmp_path / "downstream.json").write_text(json.dumps({"tasks": {"t": {"items": 8, "chance": 0.25, "source": "x"}},
                                                          "history": history}))
    (tmp_path / "eval").mkdir()
    for stamp, acc in (("20260101T000000Z", 0.4), ("20260102T000000Z", 0.6)):  # the newer file wins
        (tmp_path / "eval" / f"lm_eval-{stamp}.json").write_text(json.dumps({
            "results": {"arc_easy": {"alias": "arc_easy", "acc,none": acc, "acc_stderr,none": 0.01}},
            "n-shot": {"arc_easy": 0}, "lm_eval_version": "0.4.13"}))
    return tmp_path


def test_latest_lm_eval_result_per_task(run_dir):
    latest = latest_lm_eval_results(run_dir)
    assert latest["arc_easy"]["metrics"] == {"acc": 0.6}  # no stderr, no alias
    assert latest["arc_easy"]["file"] == "lm_eval-20260102T000000Z.json"


def model_card_of(run_dir, config_yaml):
    (run_dir / "config.yaml").write_text(config_yaml)
    return model_card(run_dir)


def test_model_card_of_a_run(run_dir):
    card = model_card(run_dir)
    assert card.name == "demo" and card.datasets == ["org/corpus"]
    assert "`org/corpus` dataset" in card.training_data and "windows of 64 tokens" in card.training_data
    two = model_card_of(run_dir, "data:\n  sources:\n    web: {kind: hub, hub_name: org/corpus, weight: 3}\n"
                                 "    code: {kind: stdlib}\n  phases:\n    - {start: decay, weights: {code: 1}}\n")
    assert two.datasets == ["org/corpus"] and "A mixture: `web` (weight 3)" in two.training_data
    assert "From step decay" in two.training_data
    assert {m.dataset for m in two.metrics if m.metric == "loss"} == {"training-mixture"}
    assert card.training["tokens per step (per device)"] == 64 * 4 * 2
    assert card.training["wall time"] == "1m15s" and card.training["tokens / s"] == 341
    rows = {(m.dataset, m.metric): (m.value, m.source) for m in card.metrics}
    assert rows[("org/corpus", "loss")] == (3.5, "jetmoe")
    assert rows[("t", "acc")] == (0.5, "jetmoe downstream callback, step 50, 0-shot")
    assert rows[("arc_easy", "acc")] == (0.6, "lm-evaluation-harness 0.4.13, 0-shot")
    assert "demo" in card.training_config


def test_figures_need_data(run_dir):
    written = write_figures(run_dir)  # no TensorBoard events, no routing report: only the downstream curve
    assert list(written) == ["Downstream accuracy during training"]
    assert written["Downstream accuracy during training"] == run_dir / "figures" / "downstream.png"
