"""The memory and throughput plan: activation bytes against the model's measured memory, the state bytes
against real tensors, scaling rules, and the JetMoE-8B paper's throughput."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.distributed.plan import (
    estimate,
    format_plan,
    implied_mfu,
    local_state_bytes,
    saved_activation_bytes,
)
from jetmoe.model.backends import FusedOps
from model_helpers import use_ops

PLAN = dict(seq_len=4096, global_batch_tokens=4 * 2**20, micro_batch_size=1, gpus=96, gpu_memory_gb=80)


def live_bytes_after_forward(model: torch.nn.Module, ids: torch.Tensor, skip_logits: bool) -> int:
    """Net bytes the CPU allocator hands out during the forward and still holds at its end (what autograd
    keeps for backward, plus the outputs), from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(ids, labels=ids, skip_logits=skip_logits)
    del out
    return sum(event.self_cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize(
    ("dtype", "checkpointing", "skip_logits"),
    [(torch.float32, "none", False), (torch.float32, "none", True), (torch.float32, "full", True),
     (torch.bfloat16, "none", True)],
)
def test_activation_estimate_matches_the_measured_forward(dtype, checkpointing, skip_logits):
    config = JetMoeConfig.from_name("small", num_hidden_layers=2)
    # The operations a GPU runs (`FusedOps`), whatever this CPU's bf16 support.
    model = use_ops(JetMoeForCausalLM(config).to(dtype).train(), FusedOps())
    ids = torch.randint(0, config.vocab_size, (2, 128))
    model(ids, labels=ids, skip_logits=skip_logits).loss.backward()  # warm-up: one-off probes and allocations
    if checkpointing == "full":
        model.gradient_checkpointing_enable()  # checkpoints every block, as parallelize_jetmoe's "full"
    measured = live_bytes_after_forward(model, ids, skip_logits)
    estimated = saved_activation_bytes(config, ids.numel(), dtype.itemsize, checkpointing, skip_logits)
    assert estimated == pytest.approx(measured, rel=0.05)


def test_state_bytes_per_parameter_match_real_tensors(tiny_config):
    model = JetMoeForCausalLM(tiny_config)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    measured = local_state_bytes(model, opt)
    total = tiny_config.num_parameters()["total"]
    plan = estimate(tiny_config, **{**PLAN, "seq_len": 8, "gpus": 1}, precision="32-true")
    assert measured["params"] == total * 4 == pytest.approx(plan["params_gb"] * 1e9)
    assert measured["optimizer"] == pytest.approx(plan["optimizer_gb"] * 1e9, rel=1e-3)  # + the step counters


def test_sharding_precision_and_checkpointing_scale_the_plan():
    config = JetMoeConfig.from_name("jetmoe-8b")
    one, many = estimate(config, **{**PLAN, "gpus": 1}), estimate(config, **{**PLAN, "gpus": 8})
    for key in ("params_gb", "grads_gb", "optimizer_gb"):
        assert one[key] == pytest.approx(8 * many[key])
    assert one["activations_gb"] == many["activations_gb"]
    bf16_true = estimate(config, **PLAN, precision="bf16-true")
    assert bf16_true["optimizer_gb"] == pytest.approx(many["optimizer_gb"] * 8 / 96 / 2)
    full = estimate(config, **PLAN, activation_checkpointing="full")
    selective = estimate(config, **PLAN, activation_checkpointing="selective")
    assert full["activations_gb"] < selective["activations_gb"] < full["activations_no_ckpt_gb"]
    assert not estimate(config, **{**PLAN, "micro_batch_size": 8})["fits"]
    assert estimate(config, **PLAN)["grad_accum_steps"] == 11  # ceil(4 Mi / (96 * 4096))


def test_jetmoe_8b_paper_throughput_implies_about_a_fifth_of_h100_peak():
    """1.25T tokens in 30,000 H100-hours on 96 GPUs is 96B tokens/day, matching the ~100B/day quoted."""
    config = JetMoeConfig.from_name("jetmoe-8b")
    tokens_per_day = 1.25e12 / (30_000 / 96 / 24)
    assert tokens_per_day == pytest.approx(96e9)
    mfu = implied_mfu(config, seq_len=4096, tokens_per_day=tokens_per_day, gpus=96, peak_tflops=989)
    assert mfu == pytest.approx(0.22, abs=0.01)
    assert estimate(config, **PLAN, mfu=mfu)["tokens_per_day"] == pytest.approx(tokens_per_day)


def test_format_plan_lists_memory_fit_and_throughput():
    text = format_plan(estimate(JetMoeConfig.from_name("jetmoe-8b"), **PLAN, activation_checkpointing="full"))
    for fragment in ("AdamW states (sharded)", "activations", "fits", "grad accumulation", "tokens/day"):
        assert fragment in text
