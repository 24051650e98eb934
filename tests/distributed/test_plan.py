"""The memory and throughput plan: activation bytes against the model's measured memory, the state bytes
against real tensors, scaling rules, the JetMoE-8B paper's throughput, and expert parallelism's memory and
bytes sent (the all-to-all bytes against the exchanges of a real run: test_expert_parallel.py)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.distributed.plan import (
    communication_bytes,
    estimate,
    expert_parallel_options,
    format_expert_parallel_options,
    format_plan,
    implied_mfu,
    local_state_bytes,
    saved_activation_bytes,
)
from jetmoe.errors import ConfigError
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
    for fragment in ("AdamW states (sharded)", "activations", "fits", "grad accumulation", "tokens/day",
                     "expert parallel", "sent per device/step"):
        assert fragment in text


# ----------------------------------------------------------------------------- expert parallelism


def test_expert_parallelism_keeps_the_sharded_state_and_shrinks_the_gathered_experts():
    config = JetMoeConfig.from_name("jetmoe-8b", num_local_experts=64)
    fsdp, ep = estimate(config, **PLAN), estimate(config, **PLAN, expert_parallel=8)
    for key in ("params_gb", "grads_gb", "optimizer_gb", "activations_gb"):
        assert ep[key] == fsdp[key], key  # experts /8 over EP, /12 over FSDP: still /96 per device
    D, F, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    block_experts = E * 3 * D * F  # one block's MoE experts; EP gathers 1/8 of them
    assert fsdp["fsdp_buffers_gb"] - ep["fsdp_buffers_gb"] == pytest.approx(3 * block_experts * 7 / 8 * 2 / 1e9)
    assert fsdp["all_to_all_gb"] == 0 < ep["all_to_all_gb"]
    assert ep["all_gather_gb"] < fsdp["all_gather_gb"] and ep["sent_gb"] < fsdp["sent_gb"]
    moa = estimate(config, **PLAN, expert_parallel=8, expert_parallel_attention=True)
    assert moa["fsdp_buffers_gb"] < ep["fsdp_buffers_gb"] and moa["all_to_all_gb"] > ep["all_to_all_gb"]


def test_communication_bytes_by_hand():
    """The test preset on 4 devices, EP 2, fp32, no checkpointing, 10 tokens: each collective counted by hand."""
    config = JetMoeConfig.from_name("test")  # D 64, F 64, E 4, k 2, L 2, A 32, vocab 128 (tied)
    sent = communication_bytes(config, tokens=10, gpus=4, precision="32-true", activation_checkpointing="none",
                               expert_parallel=2)
    root = 128 * 64 + 64
    experts = 2 * 4 * 3 * 64 * 64  # L · E · 3·D·F
    blocks = config.num_parameters()["total"] - root - experts
    gathered = blocks * 3 / 4 + experts / 2 * 1 / 2  # over the 4 ranks; the local half over the 2 others
    assert sent["all_gather"] == pytest.approx(4 * (root * 3 / 4 + 2 * gathered))
    assert sent["reduce_scatter"] == pytest.approx(4 * (root * 3 / 4 + gathered))
    rows = 10 * 2
    assert sent["all_to_all"] == pytest.approx(4 * rows * (2 * 64) * (2 * 2) * 1 / 2)  # out + back, fwd + bwd, 2 layers
    full = communication_bytes(config, tokens=10, gpus=4, precision="32-true", activation_checkpointing="full",
                               expert_parallel=2, expert_parallel_attention=True)
    assert full["all_to_all"] == pytest.approx(4 * rows * (2 * 64 + 2 * (64 + 32)) * (2 * 2 + 2) * 1 / 2)
    alone = communication_bytes(config, tokens=10, gpus=1, precision="32-true", activation_checkpointing="none")
    assert alone == {"all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}


def test_the_options_table_names_the_degree_that_sends_the_fewest_bytes():
    config = JetMoeConfig.from_name("jetmoe-8b", num_local_experts=64)
    plan = {**PLAN, "gpus": 128, "micro_batch_size": 8, "activation_checkpointing": "full"}
    options = expert_parallel_options(config, **plan)
    assert [o["expert_parallel"] for o in options] == [1, 2, 4, 8, 16, 32, 64]
    assert [o["ep_within_node"] for o in options] == [True] * 4 + [False] * 3
    text = format_expert_parallel_options(options, configured=8)
    fewest = min(options, key=lambda o: o["sent_gb"])["expert_parallel"]
    inside = min((o for o in options if o["ep_within_node"]), key=lambda o: o["sent_gb"])["expert_parallel"]
    assert (fewest, inside) == (64, 8)
    assert text.endswith(f"expert_parallel={fewest} moves the fewest bytes; inside a node, expert_parallel={inside}")
    assert "8 (configured)" in text
    small = expert_parallel_options(JetMoeConfig.from_name("jetmoe-8b"), **{**PLAN, "micro_batch_size": 8})
    assert format_expert_parallel_options(small, configured=1).splitlines()[1].startswith("1 (configured)")


@pytest.mark.parametrize(("degree", "gpus", "message"), [
    (3, 96, r"expert_parallel \(3\) must divide num_local_experts \(8\)"),
    (8, 12, r"expert_parallel \(8\) must divide gpus \(12\)"),
    (0, 96, r"expert_parallel must be >= 1, got 0"),
])
def test_impossible_expert_parallel_degrees_are_refused(degree, gpus, message):
    with pytest.raises(ConfigError, match=message):
        estimate(JetMoeConfig.from_name("jetmoe-8b"), **{**PLAN, "gpus": gpus}, expert_parallel=degree)


def test_degree_errors_name_the_callers_keys():
    """`jetmoe plan` passes how its user spells the degree and the device count: a config key and a flag."""
    names = {"expert_parallel": "trainer.expert_parallel", "gpus": "--gpus"}
    with pytest.raises(ConfigError, match=r"^trainer\.expert_parallel \(8\) must divide --gpus \(12\)$"):
        estimate(JetMoeConfig.from_name("jetmoe-8b"), **{**PLAN, "gpus": 12}, expert_parallel=8, names=names)
