"""Memory and throughput plan of an FSDP2 JetMoE run: `estimate` (a pure function) and `format_plan`, what
`jetmoe plan` prints; `local_state_bytes` measures the same memory on a live model.

Per device, FSDP2 fully sharded over all `gpus` (bytes; GB = 1e9 bytes):

* parameters, gradients, AdamW states (m, v) — sharded, so divided by `gpus`. Bytes per parameter:
  32-true 4 + 4 + 8; bf16-mixed 4 + 4 + 8 (the sharded fp32 parameter *is* the master copy; bf16 copies
  exist only unsharded while a block runs); bf16-true 2 + 2 + 4 (no fp32 copy anywhere).
* FSDP buffers: unsharded compute-dtype parameters of the root unit (embeddings, tied head, norm) plus two
  decoder blocks (the running one and the prefetched one), plus one block's unsharded gradients.
* activations of one micro-batch (N = micro_batch_size · seq_len tokens): what autograd keeps after the
  forward, `saved_activation_bytes` (formula below, checked against the model in tests/distributed), plus,
  with activation checkpointing, one block's activations recomputed during backward.

Activation bytes per decoder block: `block_activation_terms` lists the tensors the model keeps for backward
(s = activation dtype bytes, 4 or 2; N tokens; M = N·k routed rows; D hidden; A = H·Dh one expert's
attention width; F expert intermediate size; E experts; k top-k; H key/value heads)::

    hidden states    N·D·4s (fp32)  or  N·D·(3s + 8) (bf16: the routers keep fp32 copies)
                     each half's block input (kept by its norm) and norm output (kept by the K|V projection
                     and the routers; the MoE half's only by its router, in fp32)
    MoA queries/out  M·A·3s         roped queries, attention output (per slot), its copy in expert order
    MoA keys/values  N·A·3s         the K|V projection (values are a view of it) and the roped keys
    MoA / MoE rows   M·D·4s         routed input rows and expert outputs, for MoA and MoE each
    MoE GLU          M·F·3s         routed rows of width 2F (gate | up) and the expert input silu(gate)·up
    attention lse    N·k·H·4        fp32 log-sum-exp of the attention kernel
    routers          2·(N·E·8 + M·(32 + s) + N·4) + M·H·16
                     per router, its `Routing`: fp32 logits (z-loss) and softmax probabilities (load-balancing
                     loss), the gates, four int64 index vectors (top-k, sort, inverse sort, token) and the fp32
                     token weights of the balancing statistics; MoA's two int64 head permutations

A checkpointed block keeps only its input (N·D·s) and its routers' `Routing`s (the forward returns them, and
the auxiliary losses read them): 2·(N·E·8 + M·(32 + s) + N·4). The LM head keeps the final norm's input and output (N·D·2s), the
logits (N·V·s) and the fp32 log-probabilities of the cross-entropy (N·V·4); with `skip_logits=True` (the
fused chunked cross-entropy, what training uses) the norm output and the last two become N·D·s + V·D·s (the
stored gradients) instead.

Throughput: model FLOPs per token = 6·N_active + 12·L·(k·H·Dh)·T (PaLM's convention: causal masking not
discounted, recomputation not counted), tokens/day = gpus · peak_tflops · mfu · 86400 / FLOPs per token.

Expert parallelism (EP) of degree P over W = gpus devices (`jetmoe.distributed.expert_parallel`): the sharded
experts X (MoE: L·E·3·D·F parameters; with `expert_parallel_attention` also MoA: L·E·2·D·A) are split over P
ranks and FSDP-sharded over the Q = W/P others, so parameters, gradients and AdamW states stay /W per device; a
block's FSDP buffers hold only its E/P local experts: block parameters − (X/L)·(1 − 1/P). Activations are
those of balanced routing (a rank then receives as many rows as it sends; skewed routing brings it more), without
the two int64 permutations of each exchange (16·M bytes per exchanged layer).

Communication, bytes one device sends per micro-batch (ring collectives: a group of n moves (n−1)/n of the
tensor), in the all-gather dtype c and reduce dtype r of the precision (32-true 4 | 4, bf16-mixed 2 | 4,
bf16-true 2 | 2) and the activation dtype s::

    FSDP all-gather       c · [R·(W−1)/W + 2·(B·(W−1)/W + X/P·(Q−1)/Q)]     root once, blocks forward + backward
    FSDP reduce-scatter   r · [R·(W−1)/W + B·(W−1)/W + X/P·(Q−1)/Q]
    EP all-to-all         s · M·(2D + 2(D + A)·[MoA sharded]) · (2L + L_ckpt) · (P−1)/P

with R the root unit's parameters, B all blocks' parameters but the sharded experts (with P = 1: all of them, X =
0), M = N·k routed rows, L_ckpt the checkpointed blocks (their forward, exchanges included, runs again in backward)
and (P−1)/P of the rows leaving the rank under balanced routing: each MoE layer sends its rows out and their
outputs back (D wide each way), forward and backward; a sharded MoA does so around both of its projections (D in
and A back, A in and D back). The per-expert row counts exchanged first (E·8 bytes) are left out. Per optimizer
step, times the accumulation steps. `expert_parallel_options` evaluates every degree that divides E and W, so a
plan says which moves fewer bytes per device: FSDP alone, or EP at a degree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from jetmoe.config import JetMoeConfig
from jetmoe.config import PRECISIONS
from jetmoe.distributed.mesh import check_expert_parallel
from jetmoe.distributed.parallelize import ACTIVATION_CHECKPOINTING
from jetmoe.errors import ConfigError, check_choice

GB = 1e9
USABLE_FRACTION = 0.9  # of gpu_memory_gb: CUDA context, NCCL buffers, allocator fragmentation
# (parameter, gradient, AdamW m + v) bytes per parameter, and the activation dtype's bytes.
STATE_BYTES = {"32-true": (4, 4, 8), "bf16-mixed": (4, 4, 8), "bf16-true": (2, 2, 4)}
ACTIVATION_DTYPE_BYTES = {"32-true": 4, "bf16-mixed": 2, "bf16-true": 2}
# FSDP2's all-gather dtype (the mixed-precision param_dtype) and gradient reduce dtype, bytes.
COLLECTIVE_BYTES = {"32-true": (4, 4), "bf16-mixed": (2, 4), "bf16-true": (2, 2)}


def block_activation_terms(config: JetMoeConfig, tokens: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes one decoder block keeps for backward for `tokens` tokens, by kind (see the module docstring)."""
    s, N, k = dtype_bytes, tokens, config.num_experts_per_tok
    D, F, E, H = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_key_value_heads
    A, M = H * config.kv_channels, tokens * k
    return {
        "hidden states": N * D * (4 * s if s == 4 else 3 * s + 8),
        "MoA queries/out": M * A * 3 * s,
        "MoA keys/values": N * A * 3 * s,
        "MoA / MoE rows": M * D * 4 * s,
        "MoE GLU": M * F * 3 * s,
        "attention lse": N * k * H * 4,
        "routers": _router_bytes(config, tokens, dtype_bytes) + M * H * 16,
    }


def block_activation_bytes(config: JetMoeConfig, tokens: int, dtype_bytes: int) -> int:
    return sum(block_activation_terms(config, tokens, dtype_bytes).values())


def _router_bytes(config: JetMoeConfig, tokens: int, dtype_bytes: int) -> int:
    """The `Routing`s of a block's two routers."""
    M = tokens * config.num_experts_per_tok
    return 2 * (tokens * config.num_local_experts * 8 + M * (32 + dtype_bytes) + tokens * 4)


def _checkpointed_block_bytes(config: JetMoeConfig, tokens: int, dtype_bytes: int) -> int:
    """A checkpointed block keeps its input and its routers' `Routing`s."""
    return tokens * config.hidden_size * dtype_bytes + _router_bytes(config, tokens, dtype_bytes)


def _head_bytes(config: JetMoeConfig, tokens: int, dtype_bytes: int, skip_logits: bool) -> int:
    """Final norm's input, then its output, the logits and the fp32 log-probabilities of the cross-entropy, or
    (fused CE) the stored gradients of the hidden states and the LM-head weight."""
    norm_input = tokens * config.hidden_size * dtype_bytes
    if skip_logits:
        return norm_input + (tokens + config.vocab_size) * config.hidden_size * dtype_bytes
    return 2 * norm_input + tokens * config.vocab_size * (dtype_bytes + 4)


def checkpointed_blocks(num_layers: int, activation_checkpointing: str) -> int:
    """How many blocks `parallelize_jetmoe` checkpoints: all ("full"), blocks 0, 2, 4, ... ("selective")."""
    check_choice("activation_checkpointing", activation_checkpointing, ACTIVATION_CHECKPOINTING)
    return {"none": 0, "full": num_layers, "selective": (num_layers + 1) // 2}[activation_checkpointing]


def saved_activation_bytes(
    config: JetMoeConfig, tokens: int, dtype_bytes: int, activation_checkpointing: str, skip_logits: bool = True
) -> int:
    """Bytes autograd holds at the end of the forward of `tokens` tokens (blocks + LM head); `skip_logits` as
    the model's argument (what training uses)."""
    L = config.num_hidden_layers
    ckpt = checkpointed_blocks(L, activation_checkpointing)
    return (
        (L - ckpt) * block_activation_bytes(config, tokens, dtype_bytes)
        + ckpt * _checkpointed_block_bytes(config, tokens, dtype_bytes)
        + _head_bytes(config, tokens, dtype_bytes, skip_logits)
    )


def flops_per_token(config: JetMoeConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: 6·N_active + 12·L·(k·H·Dh)·T (forward + backward)."""
    attention_width = config.num_experts_per_tok * config.num_key_value_heads * config.kv_channels
    return 6 * config.num_parameters()["active"] + 12 * config.num_hidden_layers * attention_width * seq_len


def _root_parameters(config: JetMoeConfig) -> int:
    """The root FSDP unit: embeddings (and an untied head) plus the final norm."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def _block_parameters(config: JetMoeConfig) -> int:
    """One decoder block (all its experts): an FSDP unit."""
    return (config.num_parameters()["total"] - _root_parameters(config)) // config.num_hidden_layers


def expert_parameters(config: JetMoeConfig, attention: bool = False) -> int:
    """The parameters expert parallelism splits: every layer's MoE experts, and its MoA experts with `attention`."""
    D, E = config.hidden_size, config.num_local_experts
    A = config.num_key_value_heads * config.kv_channels
    return config.num_hidden_layers * E * (3 * D * config.intermediate_size + (2 * D * A if attention else 0))


def communication_bytes(
    config: JetMoeConfig, *, tokens: int, gpus: int, precision: str, activation_checkpointing: str,
    expert_parallel: int = 1, expert_parallel_attention: bool = False,
) -> dict[str, float]:
    """Bytes one device sends per micro-batch of `tokens` tokens: FSDP all-gathers and reduce-scatters, EP
    all-to-alls (module docstring)."""
    W, P = gpus, expert_parallel
    Q = W // P
    c, r = COLLECTIVE_BYTES[precision]
    share = lambda n: (n - 1) / n  # noqa: E731
    root = _root_parameters(config)
    experts = expert_parameters(config, expert_parallel_attention) if P > 1 else 0
    blocks = config.num_parameters()["total"] - root - experts
    gathered = blocks * share(W) + experts / P * share(Q)
    D, A, L = config.hidden_size, config.num_key_value_heads * config.kv_channels, config.num_hidden_layers
    width = 2 * D + (2 * (D + A) if expert_parallel_attention else 0)
    passes = 2 * L + checkpointed_blocks(L, activation_checkpointing)
    rows = tokens * config.num_experts_per_tok
    return {
        "all_gather": c * (root * share(W) + 2 * gathered),
        "reduce_scatter": r * (root * share(W) + gathered),
        "all_to_all": ACTIVATION_DTYPE_BYTES[precision] * rows * width * passes * share(P) if P > 1 else 0.0,
    }


def estimate(
    config: JetMoeConfig,
    *,
    seq_len: int,
    global_batch_tokens: int,
    micro_batch_size: int,
    gpus: int,
    gpu_memory_gb: float,
    precision: str = "bf16-mixed",
    activation_checkpointing: str = "none",
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
    expert_parallel: int = 1,
    expert_parallel_attention: bool = False,
    gpus_per_node: int = 8,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Per-device memory (GB), whether it fits, gradient-accumulation steps, bytes sent per step and throughput
    of an FSDP2 run, with experts split over groups of `expert_parallel` devices (module docstring).

    `peak_tflops`: dense bf16 peak of one device (H100 SXM: 989); `gpus_per_node` tells whether an EP group
    (consecutive ranks) stays inside a node. `names`: how the caller's user spells the arguments in errors
    (`jetmoe plan`: {"expert_parallel": "trainer.expert_parallel", "gpus": "--gpus"}), else their own names."""
    names = names or {}
    check_choice("precision", precision, PRECISIONS)
    for name, value in (("seq_len", seq_len), ("global_batch_tokens", global_batch_tokens),
                        ("micro_batch_size", micro_batch_size), ("gpus", gpus), ("gpus_per_node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{names.get(name, name)} must be >= 1, got {value}")
    check_expert_parallel(expert_parallel, ranks=gpus, ranks_name=names.get("gpus", "gpus"),
                          experts=config.num_local_experts, name=names.get("expert_parallel", "expert_parallel"))
    counts = config.num_parameters()
    p_bytes, g_bytes, o_bytes = STATE_BYTES[precision]
    s = ACTIVATION_DTYPE_BYTES[precision]
    tokens = micro_batch_size * seq_len
    compute_bytes = COLLECTIVE_BYTES[precision][0]
    remote_experts = expert_parameters(config, expert_parallel_attention) * (1 - 1 / expert_parallel)
    block_unsharded = _block_parameters(config) - remote_experts / config.num_hidden_layers
    memory = {
        "params_gb": counts["total"] * p_bytes / gpus / GB,
        "grads_gb": counts["total"] * g_bytes / gpus / GB,
        "optimizer_gb": counts["total"] * o_bytes / gpus / GB,
        "fsdp_buffers_gb": (_root_parameters(config) + 3 * block_unsharded) * compute_bytes / GB,
        "activations_gb": _peak_activations(config, tokens, s, activation_checkpointing) / GB,
    }
    total_gb = sum(memory.values())
    tokens_per_micro_step = tokens * gpus
    accumulation = math.ceil(global_batch_tokens / tokens_per_micro_step)
    per_token = flops_per_token(config, seq_len)
    tokens_per_sec = gpus * peak_tflops * 1e12 * mfu / per_token
    sent = {
        f"{name}_gb": value * accumulation / GB
        for name, value in communication_bytes(
            config, tokens=tokens, gpus=gpus, precision=precision, activation_checkpointing=activation_checkpointing,
            expert_parallel=expert_parallel, expert_parallel_attention=expert_parallel_attention,
        ).items()
    }
    return {
        "params_total": counts["total"],
        "params_active": counts["active"],
        "precision": precision,
        "activation_checkpointing": activation_checkpointing,
        "expert_parallel": expert_parallel,
        "expert_parallel_attention": expert_parallel_attention,
        "ep_within_node": gpus_per_node % expert_parallel == 0,  # EP groups are consecutive ranks
        **memory,
        **sent,
        "sent_gb": sum(sent.values()),
        "activations_no_ckpt_gb": _peak_activations(config, tokens, s, "none") / GB,
        "activations_full_ckpt_gb": _peak_activations(config, tokens, s, "full") / GB,
        "total_gb": total_gb,
        "usable_gb": gpu_memory_gb * USABLE_FRACTION,
        "fits": total_gb <= gpu_memory_gb * USABLE_FRACTION,
        "grad_accum_steps": accumulation,
        "global_batch_tokens": accumulation * tokens_per_micro_step,  # rounded up to whole micro-batches
        "flops_per_token": per_token,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_day": tokens_per_sec * 86400,
        "gpus": gpus,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
    }


def expert_parallel_options(config: JetMoeConfig, **plan: Any) -> list[dict[str, Any]]:
    """`estimate` at every expert-parallel degree that divides both the expert count and `plan["gpus"]` (1, FSDP
    alone, first)."""
    degrees = [p for p in range(1, config.num_local_experts + 1)
               if config.num_local_experts % p == 0 and plan["gpus"] % p == 0]
    return [estimate(config, **{**plan, "expert_parallel": p}) for p in degrees]


def _peak_activations(config: JetMoeConfig, tokens: int, dtype_bytes: int, activation_checkpointing: str) -> int:
    """Saved activations plus, with checkpointing, the block being recomputed in backward."""
    recompute = 0 if activation_checkpointing == "none" else block_activation_bytes(config, tokens, dtype_bytes)
    return saved_activation_bytes(config, tokens, dtype_bytes, activation_checkpointing) + recompute


def implied_mfu(config: JetMoeConfig, *, seq_len: int, tokens_per_day: float, gpus: int, peak_tflops: float) -> float:
    """The MFU at which `gpus` devices train `tokens_per_day` (inverse of `estimate`'s throughput)."""
    return tokens_per_day / 86400 * flops_per_token(config, seq_len) / (gpus * peak_tflops * 1e12)


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Measured counterpart of the plan: bytes this rank holds of parameters, gradients and optimizer state
    (the local shards of DTensors, whole tensors otherwise), counted from the tensors themselves."""
    params = list(model.parameters())
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(t) for t in states),
    }


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def format_plan(plan: dict[str, Any]) -> str:
    """A two-column text table of `estimate`'s result."""
    rows = [
        ("parameters", f"{plan['params_total'] / 1e9:.2f}B total, {plan['params_active'] / 1e9:.2f}B active"),
        ("precision / checkpointing", f"{plan['precision']} / {plan['activation_checkpointing']}"),
        ("params (sharded)", f"{plan['params_gb']:.2f} GB"),
        ("grads (sharded)", f"{plan['grads_gb']:.2f} GB"),
        ("AdamW states (sharded)", f"{plan['optimizer_gb']:.2f} GB"),
        ("FSDP unsharded buffers", f"{plan['fsdp_buffers_gb']:.2f} GB"),
        ("activations", f"{plan['activations_gb']:.2f} GB (none {plan['activations_no_ckpt_gb']:.2f}, "
                        f"full ckpt {plan['activations_full_ckpt_gb']:.2f})"),
        ("total per device", f"{plan['total_gb']:.2f} GB of {plan['usable_gb']:.1f} usable: "
                             f"{'fits' if plan['fits'] else 'DOES NOT FIT'}"),
        ("grad accumulation", f"{plan['grad_accum_steps']} steps ({plan['global_batch_tokens']:,} tokens/step)"),
        ("expert parallel", _expert_layout(plan)),
        ("sent per device/step", f"{plan['sent_gb']:.2f} GB: all-gather {plan['all_gather_gb']:.2f}, "
                                 f"reduce-scatter {plan['reduce_scatter_gb']:.2f}, all-to-all {plan['all_to_all_gb']:.2f}"),
        ("FLOPs per token", f"{plan['flops_per_token'] / 1e9:.2f} GFLOP"),
        ("throughput", f"{plan['tokens_per_sec']:,.0f} tokens/s = {plan['tokens_per_day'] / 1e9:.1f}B tokens/day "
                       f"({plan['gpus']} devices at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:g} TFLOPS)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _expert_layout(plan: dict[str, Any]) -> str:
    P, W = plan["expert_parallel"], plan["gpus"]
    if P == 1:
        return f"none: FSDP over all {W} devices"
    experts = "MoE and MoA experts" if plan["expert_parallel_attention"] else "MoE experts"
    where = "inside a node" if plan["ep_within_node"] else "ACROSS NODES (the all-to-all leaves the node)"
    return f"{experts} split over {P} devices ({where}), FSDP over {W // P}"


def format_expert_parallel_options(options: list[dict[str, Any]], configured: int) -> str:
    """A table of `expert_parallel_options`' plans: bytes sent and memory per device at each degree, and which
    degree sends the fewest bytes."""
    fewest = _fewest_bytes(options)
    header = ("expert_parallel", "all-gather GB", "reduce-scatter GB", "all-to-all GB", "sent GB", "memory GB", "")
    rows = [header] + [
        (f"{plan['expert_parallel']}{' (configured)' if plan['expert_parallel'] == configured else ''}",
         f"{plan['all_gather_gb']:.2f}", f"{plan['reduce_scatter_gb']:.2f}", f"{plan['all_to_all_gb']:.2f}",
         f"{plan['sent_gb']:.2f}", f"{plan['total_gb']:.2f}",
         ", ".join(note for note, on in (("fewest bytes", plan["expert_parallel"] == fewest),
                                         ("crosses nodes", not plan["ep_within_node"])) if on))
        for plan in options
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    verdict = ("FSDP alone moves the fewest bytes" if fewest == 1 else
               f"expert_parallel={fewest} moves the fewest bytes")
    inside = _fewest_bytes([plan for plan in options if plan["ep_within_node"]])
    if inside != fewest:
        verdict += f"; inside a node, {'FSDP alone' if inside == 1 else f'expert_parallel={inside}'}"
    return "\n".join(lines + [f"bytes sent per device and optimizer step: {verdict}"])


def _fewest_bytes(options: list[dict[str, Any]]) -> int:
    return min(options, key=lambda plan: plan["sent_gb"])["expert_parallel"]
