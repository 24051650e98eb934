"""Notebook helpers: token typing, routing traces and their statistics, checkpoints, sweep interpretation, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.analysis import (
    RoutingTrace,
    classify_code_chars,
    classify_tokens,
    expert_top_tokens,
    fresh_model,
    interpret_sweep,
    load_checkpoints,
    load_matrix,
    router_table,
    routing_by_stage,
    routing_stats,
    trace_routing,
    type_expert_information,
    type_preference,
)
from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer
from model_helpers import routes

CODE = '''import os

class Box:
    """A box."""
    size = 0x10  # bytes

    def grow(self, by=2):
        return self.size + by
'''


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([CODE * 5], vocab_size=300, special=SpecialTokens())


@pytest.fixture
def model(tiny_config: JetMoeConfig) -> JetMoeForCausalLM:
    return JetMoeForCausalLM(tiny_config.replace(vocab_size=300)).eval()


def spans(text: str, types: list[str], kind: str) -> list[str]:
    """The maximal runs of characters of one type."""
    runs, current = [], ""
    for char, t in zip(text, types):
        if t == kind:
            current += char
        elif current:
            runs.append(current)
            current = ""
    return runs + ([current] if current else [])


def test_code_characters_get_python_token_types():
    types = classify_code_chars(CODE)
    assert len(types) == len(CODE)
    assert spans(CODE, types, "keyword") == ["import", "class", "def", "return"]
    assert spans(CODE, types, "identifier") == ["os", "Box", "size", "grow", "self", "by", "self", "size", "by"]
    assert spans(CODE, types, "string") == ['"""A box."""']
    assert spans(CODE, types, "number") == ["0x10", "2"]
    assert spans(CODE, types, "comment") == ["# bytes"]
    assert set(spans(CODE, types, "punctuation")) == {":", "=", "(", ",", "):", ".", "+"}


def test_code_cut_from_the_middle_of_a_block_still_tokenizes():
    cut = "            return x\n        y = 'a'\n    if z:\n  s = 'unterminated\n  t = 1\n"
    types = classify_code_chars(cut)
    assert spans(cut, types, "keyword") == ["return", "if"]
    assert spans(cut, types, "identifier")[-1] == "t" and spans(cut, types, "number") == ["1"]  # restarted after the error


def test_a_token_takes_the_type_of_its_first_non_blank_character():
    text = "x = 'a'  # c\n"
    offsets = [(0, 1), (1, 3), (3, 7), (7, 9), (9, 12), (12, 13)]  # "x", " =", " 'a'", "  ", "# c", "\n"
    assert classify_tokens(text, offsets) == ["identifier", "punctuation", "string", "whitespace", "comment", "whitespace"]


def synthetic_trace(types: list[str], experts: list[int], num_experts: int = 3) -> RoutingTrace:
    """One layer whose MoA and MoE routers send token i to ``experts[i]`` (top-1)."""
    logits = torch.full((len(experts), num_experts), -5.0)
    logits[torch.arange(len(experts)), torch.tensor(experts)] = 5.0
    return RoutingTrace("", list(range(len(types))), [(0, 0)] * len(types), list(routes([logits, logits.clone()], 1)))


def test_type_preference_and_information():
    types = ["keyword", "keyword", "string", "string", "comment", "comment"]
    determined = synthetic_trace(types, [0, 0, 1, 1, 2, 2])
    present, share = type_preference(determined, types, "moe", 0)
    assert present == ["keyword", "string", "comment"]  # TOKEN_TYPES order
    np.testing.assert_array_equal(share, np.eye(3))
    info = type_expert_information(determined, types)
    assert info[0]["mi_bits"] == pytest.approx(math.log2(3), abs=1e-4) and info[0]["mi_fraction"] == pytest.approx(1.0)
    independent = synthetic_trace(types, [0, 1, 0, 1, 0, 1])
    assert all(row["mi_bits"] == pytest.approx(0.0, abs=1e-9) for row in type_expert_information(independent, types))


def test_trace_routing_in_windows_matches_one_pass(model, tokenizer):
    whole = trace_routing(model, tokenizer, CODE, window=256)
    windows = trace_routing(model, tokenizer, CODE, window=16)
    n = len(tokenizer.encode(CODE).ids)
    assert len(whole.token_ids) == n and len(whole.routings) == 2 * model.config.num_hidden_layers
    assert whole.routings[0].logits_NE.shape == (n, model.config.num_local_experts)
    first = whole.routings[0].logits_NE[:16]
    torch.testing.assert_close(windows.routings[0].logits_NE[:16], first)  # first window: same context
    assert torch.equal(whole.experts("moa", 0), whole.routings[0].experts_Nk)
    stats = routing_stats(whole)
    np.testing.assert_allclose(load_matrix(stats, "moa").sum(1), 1.0, rtol=1e-5)
    rows = router_table(stats)
    assert [(row["kind"], row["layer"]) for row in rows] == [("moa", 0), ("moe", 0), ("moa", 1), ("moe", 1)]
    top = expert_top_tokens(whole, tokenizer, "moe", 1, min_count=1)
    assert sorted(top) == list(range(model.config.num_local_experts))


def test_checkpoints_load_by_step_and_routing_by_stage_compares_to_the_last(tmp_path, model, tokenizer):
    (tmp_path / "checkpoints").mkdir()
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    for name, step in (("best-step4.ckpt", 4), ("last.ckpt", 4), ("early.ckpt", 2)):
        torch.save({"global_step": step, "state_dict": state}, tmp_path / "checkpoints" / name)
    loaded = load_checkpoints(tmp_path, model)
    assert list(loaded) == ["step 2", "step 4"]
    torch.testing.assert_close(loaded["step 4"].state_dict(), model.state_dict())
    rows = routing_by_stage({"init": fresh_model(model), **loaded}, tokenizer, CODE)
    assert {row["top1_agreement_with_last"] for row in rows if row["stage"] != "init"} == {1.0}
    assert len(rows) == 3 * 2 * model.config.num_hidden_layers


SWEEP_ROWS = [
    {"name": "dense", "num_local_experts": 1, "num_experts_per_tok": 1, "params_total": 100, "params_active": 100,
     "tokens": 1000, "val_loss": 3.0, "val_ppl": math.exp(3.0), "imbalance": 1.0, "dead_fraction": 0.0},
    {"name": "e8_k2", "num_local_experts": 8, "num_experts_per_tok": 2, "params_total": 300, "params_active": 101,
     "tokens": 1000, "val_loss": 2.9, "val_ppl": math.exp(2.9), "imbalance": 2.5, "dead_fraction": 0.125},
    {"name": "e2_k1", "num_local_experts": 2, "num_experts_per_tok": 1, "params_total": 150, "params_active": 99,
     "tokens": 1000, "val_loss": 3.1, "val_ppl": math.exp(3.1), "imbalance": 1.2, "dead_fraction": 0.0},
]


def test_interpret_sweep_compares_each_point_with_the_dense_baseline():
    text = interpret_sweep(SWEEP_ROWS)
    assert text.splitlines()[0].startswith("Dense baseline dense: val loss 3.0000")
    assert "e8_k2 (8 experts, top-2) reaches val loss 2.9000 vs dense 3.0000 (Δ = -0.1000, -9.5% ppl) at +1.0% active" in text
    assert "1 of 2 expert configurations beat the dense baseline; best: e8_k2." in text
    assert "No dense baseline" in interpret_sweep(SWEEP_ROWS[1:])


def test_seeded_points_are_compared_with_the_baseline_of_their_seed():
    from jetmoe.analysis import interpret_seed_summary
    from jetmoe.training.sweep import seed_summary

    rows = [{**row, "name": f"{row['name']}_s{seed}", "point": row["name"], "seed": seed,
             "val_loss": row["val_loss"] + shift, "val_ppl": math.exp(row["val_loss"] + shift),
             "moa_dead_fraction": 0.0, "moe_dead_fraction": 0.0, "tokens_per_sec": 1.0}
            for seed, shift in ((1, 0.0), (2, 0.5)) for row in SWEEP_ROWS]
    text = interpret_sweep(rows, baseline="dense")
    assert "e8_k2_s2 (8 experts, top-2) reaches val loss 3.4000 vs dense 3.5000 (Δ = -0.1000" in text
    assert "2 of 4 expert configurations beat the dense baseline" in text
    verdicts = interpret_seed_summary(seed_summary(rows, "dense"), "dense").splitlines()
    assert verdicts[0].startswith("e8_k2: Δ = -0.1000 nats vs dense over 2 seed(s); better beyond noise")
    assert "worse beyond noise" in verdicts[1]  # e2_k1: +0.1 at both seeds, spread 0


def test_plots_return_figures(model, tokenizer):
    pytest.importorskip("matplotlib")
    from jetmoe.analysis import plot_load_heatmaps, plot_stage_entropy, plot_type_preference, plot_utilization
    from jetmoe.training.sweep import plot_results

    trace = trace_routing(model, tokenizer, CODE)
    types = classify_tokens(CODE, trace.offsets)
    rows = [{**row, "moa_imbalance": 1.0, "moe_imbalance": 2.0, "moa_dead_fraction": 0.0, "moe_dead_fraction": 0.1}
            for row in SWEEP_ROWS]
    figures = [
        plot_load_heatmaps(routing_stats(trace)),
        plot_type_preference(trace, types, "moa"),
        plot_stage_entropy(routing_by_stage({"a": model}, tokenizer, CODE)),
        plot_utilization(rows),
        plot_results(rows),
    ]
    assert all(len(figure.axes) >= 2 for figure in figures)
