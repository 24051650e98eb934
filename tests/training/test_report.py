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


def test_a_limited_lm_eval_run_says_so_and_stays_out_of_the_model_index(run_dir, monkeypatch):
    """`jetmoe eval RUN --tasks t --limit 4`: the result records the limit, the card's table names the 4 items, and
    model-index keeps the downstream callback's value on all 8; a full lm-eval result is never hidden by it."""
    import yaml

    from jetmoe import JetMoeConfig, JetMoeForCausalLM, save_pretrained
    from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer
    from jetmoe.training import run

    config = JetMoeConfig.from_name("test", vocab_size=300, pad_token_id=0)
    save_pretrained(JetMoeForCausalLM(config), run_dir / "hf")
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 10, 300, SpecialTokens())
    tokenizer.save(str(run_dir / "hf" / "tokenizer.json"))
    lm_eval_result = {
        "results": {task: {"alias": task, "acc,none": 0.25, "acc_stderr,none": 0.1} for task in ("t", "arc_easy")},
        "n-shot": {"t": 0, "arc_easy": 0}, "n-samples": {"t": {"original": 8, "effective": 4},
                                                         "arc_easy": {"original": 2376, "effective": 4}},
        "lm_eval_version": "0.4.13", "samples": {"t": []},
    }
    monkeypatch.setattr(run, "run_lm_eval", lambda *args, **kwargs: lm_eval_result)
    _, written = run.evaluate_tasks(run_dir, ["t", "arc_easy"], limit=4, output_dir=run_dir / "eval")
    saved = json.loads(written.read_text())
    assert saved["limit"] == 4 and "samples" not in saved

    latest = latest_lm_eval_results(run_dir)
    assert latest["t"]["partial"] and latest["t"]["items"] == 4
    assert latest["arc_easy"]["metrics"] == {"acc": 0.6} and not latest["arc_easy"]["partial"]  # the full one
    _, front, body = (run_dir / "hf" / "README.md").read_text().split("---\n", 2)
    assert "| t (4 of 8 items) | acc | 0.2500 | lm-evaluation-harness 0.4.13, 0-shot |" in body
    index = {result["dataset"]["type"]: {m["type"]: m["value"] for m in result["metrics"]}
             for result in yaml.safe_load(front)["model-index"][0]["results"]}
    assert index["t"]["acc"] == 0.5 and index["arc_easy"]["acc"] == 0.6  # not the 4-item values
