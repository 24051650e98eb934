"""JetMoE (this repo) against `transformers.JetMoeForCausalLM`: same weights, same inputs, one process.

    python bench/bench_vs_transformers.py                  # CPU preset, about 20 minutes on 2 cores
    python bench/bench_vs_transformers.py --quick          # smoke run: 1 timed iteration, no compiled rows
    python bench/bench_vs_transformers.py --config gpu     # ~1B active parameters (needs CUDA)

Writes `<out-dir>/latest.json` and `<out-dir>/latest.md` (default `bench/results/`, git-ignored); `--publish`
also writes the markdown to `bench/RESULTS.md`.

Every target row measures the call a user makes, with jetmoe's defaults; the opt-in modes (`torch.compile`, the
static cache with a compiled decode step, `jetmoe train`'s host memory policy) have rows of their own, labelled.
What is measured (ours = `jetmoe`, theirs = transformers with SDPA attention):
- training step tokens/s: `model(ids, labels=ids)` in train mode, backward, AdamW (foreach) step,
  `zero_grad(set_to_none=True)`; wall time, median of interleaved runs after a warm-up; fp32, and bf16 with both
  models cast to bf16. Ours, by default, computes the CE fused with the LM head (the logits are never
  materialised; transformers returns them). Opt-in: ours under `torch.compile`, against the same eager steps.
- forward tokens/s (eval, no grad, logits returned by both).
- decode tokens/s at batch 1 and 8: `model.generate(ids, max_new_tokens=n)`, greedy, EOS disabled, prompt included
  (ours by default: eager steps with the dynamic cache). Opt-in: ours with the static cache and a compiled step.
- the decode bound: the plain chain of matrix products one decode step needs (per layer the KV projection, the
  routers, and the query/output and MLP weights of every expert the step's tokens chose; the LM head), run for as
  many steps in two BLAS forms: `F.linear`, and `(w @ x^T)^T` for at most 16 rows (1 or 3 rows padded to 2 or 4:
  `jetmoe.kernels.cpu.decode.few_row_linear`, the form ours takes on the CPU), interleaved with the decode runs
  (one round per contender at least, the order rotating: a large L3 holds a model's weights, so what ran just
  before matters). Decode tokens/s (prompt included) are reported as a share of the faster chain's tokens/s, and of
  a bound that also counts the prompt's products (the prefill: every prompt token through the layers, touching most
  experts; then n - 1 steps' chains). Ours' prefill is timed alone too, to split ours' time into the prompt and the
  decode steps.
- peak memory of a training step: peak RSS minus RSS just before the step, in a fresh subprocess per measurement
  (after one warm-up step; glibc told to return freed blocks >= 64 KiB, so RSS follows live memory); and the saving
  of gradient checkpointing (ours; transformers' JetMoe does not support it).
- achieved FLOP/s and MFU against the best GEMM throughput measured in the same run on the bench's shapes.
- scaling: training tokens/s (forward + backward: the model's own cost; the optimizer's grows with the total
  parameters in every library) with 8, 32, 64 experts at constant active parameters (top-k and expert size fixed,
  so total parameters grow with the experts), each model in a fresh process (its allocator steady state); ours in
  two rounds over 8, 32, 64 experts, median of the pooled steps, under glibc's default host memory policy (every
  step's fresh gradients are page-faulted in again), and once more under `jetmoe train`'s policy
  (`jetmoe.training.host_memory`: freed memory is kept), which also gives a row of its own: the bench config's
  fp32 training ratio with both libraries under it (where page faults are expensive, as on a VM, glibc's default
  costs transformers' fresh per-expert allocations much more than ours). Ours also with routing forced uniform
  (`router_force_uniform`: every expert gets exactly N·k/E rows), reported separately from learned routing, whose
  rows follow the router of a freshly initialised model. The `gpu` preset scales a 2-layer variant of its model
  (64 experts in all 12 layers would be ~30B parameters).

A section (or one precision of the training rows) that runs out of device memory is skipped, named under the
table, and the rest still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from jetmoe import DynamicKVCache, JetMoeConfig, JetMoeForCausalLM
from jetmoe.kernels.cpu.decode import FEW_ROWS, few_row_linear
from jetmoe.model import TopKRouter
from jetmoe.training.host_memory import retain_freed_memory

BENCH_DIR = Path(__file__).resolve().parent

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        model=dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_key_value_heads=4, kv_channels=64,
                   intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
        batch=8, seq=512, prompt=8, new_tokens=64,
    ),
    "gpu": dict(  # ~1.2B active parameters
        model=dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=12, num_key_value_heads=16, kv_channels=128,
                   intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2),
        batch=8, seq=2048, prompt=128, new_tokens=128,
        scaling=dict(num_hidden_layers=2),  # 64 experts in all 12 layers would be ~30B parameters
    ),
    "tiny": dict(  # smoke tests
        model=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                   intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
        batch=2, seq=32, prompt=4, new_tokens=4,
    ),
}
SCALING_EXPERTS = (8, 32, 64)
TRAIN_RETAINED_LABEL = ("training tokens/s (fp32, forward + backward), both under jetmoe train's host memory policy "
                        "(fresh processes)")


def scaling_config(preset: str, experts: int, forced: bool = False) -> JetMoeConfig:
    """The preset with `experts` experts (top-k and expert size fixed), and the preset's `scaling` overrides;
    `forced`: routing forced uniform (`router_force_uniform`)."""
    return make_config(preset, num_local_experts=experts, router_force_uniform=forced,
                       **PRESETS[preset].get("scaling", {}))


def few_rows_form(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`(w @ x^T)^T` (1 or 3 rows padded to 2 or 4) for at most `FEW_ROWS` rows, else `F.linear`."""
    return few_row_linear(x, w) if len(x) <= FEW_ROWS else F.linear(x, w)


CHAIN_FORMS = {"F.linear": F.linear, "(w @ x^T)^T": few_rows_form}  # the decode chain's BLAS forms

TARGETS = {  # row name -> (comparison, threshold): ratio >= threshold, or <= for memory
    "train_fp32": (">=", 1.25),
    "train_bf16": (">=", 1.5),
    "decode_b1": (">=", 1.4),
    "decode_b8": (">=", 1.4),
    "decode_b1_chain_share": (">=", 0.85),
    "decode_b8_chain_share": (">=", 0.85),
    "train_peak_memory": ("<=", 1.0),
    "grad_checkpointing_memory": ("<=", 1.0),
    "scaling_32_experts": (">=", 0.8),
    "scaling_64_experts": (">=", 0.8),
}


# ----------------------------------------------------------------------------- setup


def make_config(preset: str, **overrides: Any) -> JetMoeConfig:
    fields = dict(PRESETS[preset]["model"], **overrides)
    seq = PRESETS[preset]["seq"]
    return JetMoeConfig(**fields, max_position_embeddings=max(2048, 2 * seq), eos_token_id=None, bos_token_id=None)


def hf_twin(model: JetMoeForCausalLM, attn: str = "sdpa") -> torch.nn.Module:
    """transformers' JetMoeForCausalLM with our weights (its SDPA attention)."""
    import transformers  # here, so that the memory workers measuring ours do not import it

    known = getattr(transformers.JetMoeConfig, "__dataclass_fields__", None)
    fields = {k: v for k, v in model.config.to_dict().items() if known is None or k in known}
    for extra in ("num_attention_heads", "expert_impl", "router_z_loss_coef", "problem_type", "num_labels"):
        fields.pop(extra, None)
    hf_config = transformers.JetMoeConfig(**fields)
    hf_config._attn_implementation = attn
    hf = transformers.JetMoeForCausalLM(hf_config).to(model.device)
    result = hf.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int, device) -> dict[str, list[float]]:
    """Run each function `warmup` times, then `iters` rounds of one call each, interleaved (so that the load of
    a shared machine hits every contender alike) in an order that rotates every round (so that no contender
    always runs after the same one, whose data it would find in, or evict from, the caches); returns the wall
    times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_ in range(iters):
        shift = round_ % len(order)
        for name, fn in order[shift:] + order[:shift]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- FLOPs


def train_flops_per_step(config: JetMoeConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step (3x the forward): projections, experts (k per token), routers, LM head,
    and causal attention (QK^T and PV over the visible half)."""
    D, E, k = config.hidden_size, config.num_local_experts, config.num_experts_per_tok
    A = config.num_key_value_heads * config.kv_channels
    per_token_layer = 2 * (D * 2 * A + k * 2 * D * A + k * 3 * D * config.intermediate_size + 2 * D * E)
    per_token = config.num_hidden_layers * per_token_layer + 2 * D * config.vocab_size
    attention = config.num_hidden_layers * batch * 4 * (k * A) * seq * (seq + 1) / 2
    return 3 * (per_token * batch * seq + attention)


def gemm_peak(device: torch.device, config: JetMoeConfig, batch: int, seq: int, iters: int) -> dict[str, Any]:
    """Best FLOP/s of plain GEMMs with the bench's shapes (tokens x width x width), fp32 and bf16."""
    N, D = batch * seq, config.hidden_size
    shapes = {
        "moe_in": (N * config.num_experts_per_tok // config.num_local_experts, D, 2 * config.intermediate_size),
        "kv_proj": (N, D, 2 * config.num_key_value_heads * config.kv_channels),
        "lm_head": (N, D, config.vocab_size),
    }
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        per_shape = {}
        for name, (m, kk, n) in shapes.items():
            a = torch.randn(m, kk, device=device, dtype=dtype)
            b = torch.randn(kk, n, device=device, dtype=dtype)
            t = median(time_interleaved({"mm": lambda: a @ b}, iters=max(3, iters), warmup=1, device=device)["mm"])
            per_shape[name] = 2 * m * kk * n / t
        key = str(dtype).removeprefix("torch.")
        out[key] = {"flops_per_s": max(per_shape.values()), "per_shape": per_shape}
    out["shapes"] = {k: list(v) for k, v in shapes.items()}
    return out


# ----------------------------------------------------------------------------- training and forward


def train_step_fn(model, ids, optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """A user's training step: `model(ids, labels=ids)` (train mode), backward, the optimizer step if given,
    gradients set to None."""

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)  # tiny lr: the weights stay comparable


def bench_training(args, device, results) -> None:
    config = make_config(args.config)
    B, T = PRESETS[args.config]["batch"], PRESETS[args.config]["seq"]
    tokens = B * T
    flops = train_flops_per_step(config, B, T)
    results.meta["train_flops_per_step"] = flops
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)

    def precision(dtype_name: str, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        ours = JetMoeForCausalLM(config).to(device).train()
        theirs = hf_twin(ours).train()
        if dtype != torch.float32:
            ours.to(dtype)
            theirs.to(dtype)
        fns = {"ours": train_step_fn(ours, ids, adamw(ours)), "theirs": train_step_fn(theirs, ids, adamw(theirs))}
        compiled_name = f"train_{dtype_name}_compiled"
        compiled_label = f"training step tokens/s ({dtype_name}; opt-in: ours torch.compile, theirs eager)"
        if args.quick:
            results.skip(compiled_name, compiled_label, "--quick")
        else:
            log(f"training step {dtype_name}, ours compiled: compiling")
            compiled = torch.compile(ours)
            fns["ours_compiled"] = train_step_fn(compiled, ids, adamw(ours))
            start = time.perf_counter()
            fns["ours_compiled"]()
            sync(device)
            compile_s = time.perf_counter() - start
        log(f"training step {dtype_name}: ours{', ours compiled' * (not args.quick)} and theirs, interleaved")
        times = time_interleaved(fns, args.train_iters if dtype == torch.float32 else args.iters, args.warmup, device)
        t_ours, t_theirs = median(times["ours"]), median(times["theirs"])
        peak = results.peak_for(dtype)
        results.add(
            f"train_{dtype_name}", f"training step tokens/s ({dtype_name}; forward, backward, AdamW)", tokens / t_ours,
            tokens / t_theirs, "tokens/s", times={k: times[k] for k in ("ours", "theirs")},
            extra={"mfu_ours": flops / t_ours / peak if peak else None,
                   "mfu_theirs": flops / t_theirs / peak if peak else None,
                   "flops_per_s_ours": flops / t_ours, "flops_per_s_theirs": flops / t_theirs},
        )
        if "ours_compiled" in times:
            t_c = median(times["ours_compiled"])
            results.add(compiled_name, compiled_label, tokens / t_c, tokens / t_theirs, "tokens/s",
                        times={"ours": times["ours_compiled"], "theirs": times["theirs"]},
                        extra={"compile_s": compile_s, "mfu_ours": flops / t_c / peak if peak else None})
        if dtype == torch.float32:
            log("forward (eval, no grad) fp32")
            ours.eval()
            theirs.eval()
            with torch.no_grad():
                times = time_interleaved({"ours": lambda: ours(ids), "theirs": lambda: theirs(ids)},
                                         args.train_iters, args.warmup, device)
            results.add("forward_fp32", "forward tokens/s (fp32, eval, logits returned)", tokens / median(times["ours"]),
                        tokens / median(times["theirs"]), "tokens/s", times=times)
        del ours, theirs, fns
        gc.collect()

    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # one may fill a GPU alone
        guard_out_of_memory(f"train {dtype_name}", device, results, precision, dtype_name, dtype)


# ----------------------------------------------------------------------------- decoding


def _chain_matrices(model: JetMoeForCausalLM, chosen: list[torch.Tensor], rows: int, batch: int):
    """The (weight `[out, in]`, rows) products of one forward of `rows` tokens whose routers chose `chosen` (one
    tensor a router, in layer order), with the LM head on the last position of each of `batch` sequences; and
    the experts touched per router."""
    mats: list[tuple[torch.Tensor, int]] = []
    touched_per_router = []
    for i, layer in enumerate(model.model.layers):
        moa, moe = layer.self_attention.experts, layer.mlp
        mats += [(layer.self_attention.kv_proj.weight, rows), (moa.router.layer.weight, rows),
                 (moe.router.layer.weight, rows)]
        for module, experts in ((moa, chosen[2 * i]), (moe, chosen[2 * i + 1])):
            counts = torch.bincount(experts, minlength=module.router.num_experts).tolist()
            touched = [(e, c) for e, c in enumerate(counts) if c > 0]
            touched_per_router.append(len(touched))
            for e, c in touched:
                mats += [(module.input_linear.weight[e], c), (module.output_linear.weight[e], c)]
    mats.append((model.lm_head.weight, batch))
    return mats, touched_per_router


def decode_chain(
    model: JetMoeForCausalLM, batch: int, prompt_ids: torch.Tensor, products: dict[str, Callable]
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]], dict]:
    """The plain chains of matrix products a `generate` call needs, one chain per form (`product(x, w) = x @
    w^T`) on the same weights and inputs: for one decode step, per layer the KV projection, both routers, and
    for every expert a token of the step chose, its query/output (MoA) and input/output (MoE) weights applied to
    the rows routed to it; then the LM head. The experts are those of a real decode step of the model. And the
    same for the prompt (the prefill: every prompt token through the layers, the LM head on the last)."""
    chosen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: chosen.append(out.experts_Nk.flatten().cpu()))
        for m in model.modules() if isinstance(m, TopKRouter)
    ]
    try:
        with torch.no_grad():
            cache = DynamicKVCache(model.config.num_hidden_layers)
            logits = model(prompt_ids, past_key_values=cache, use_cache=True).logits
            prompt_chosen = list(chosen)
            chosen.clear()
            model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    step_mats, touched = _chain_matrices(model, chosen, batch, batch)
    prompt_mats, _ = _chain_matrices(model, prompt_chosen, prompt_ids.numel(), batch)
    device, dtype = model.device, model.dtype

    def chains(mats: list[tuple[torch.Tensor, int]]) -> dict[str, Callable[[], None]]:
        inputs = [torch.randn(rows, w.shape[1], device=device, dtype=dtype) for w, rows in mats]

        def chain(product: Callable) -> Callable[[], None]:
            @torch.no_grad()
            def run() -> None:
                for (w, _), x in zip(mats, inputs):
                    product(x, w)
            return run
        return {form: chain(product) for form, product in products.items()}

    info = {"weight_bytes": sum(w.numel() * w.element_size() for w, _ in step_mats), "matmuls": len(step_mats),
            "mean_experts_touched_per_router": statistics.mean(touched),
            "prompt_weight_bytes": sum(w.numel() * w.element_size() for w, _ in prompt_mats)}
    return chains(step_mats), chains(prompt_mats), info


def bench_decode(args, device, results) -> None:
    config = make_config(args.config)
    P = PRESETS[args.config]["prompt"]
    n = PRESETS[args.config]["new_tokens"] if not args.quick else min(8, PRESETS[args.config]["new_tokens"])
    torch.manual_seed(0)
    ours = JetMoeForCausalLM(config).to(device).eval()
    theirs = hf_twin(ours).eval()
    for batch in (1, 8):
        torch.manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (batch, P), device=device)
        outs: dict[str, torch.Tensor] = {}

        def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def call() -> None:
                outs[name] = fn()
            return call

        fns = {
            "ours": run("ours", lambda: ours.generate(ids, max_new_tokens=n, eos_token_id=[])),
            "theirs": run("theirs", lambda: theirs.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)),
        }
        compile_s = None
        if not args.quick:
            def static() -> torch.Tensor:
                return ours.generate(ids, max_new_tokens=n, eos_token_id=[], static_cache=True, compile=True)
            log(f"decode batch {batch}: compiling the static-cache step")
            start = time.perf_counter()
            static()
            compile_s = time.perf_counter() - start
            fns["ours_static_compiled"] = run("ours_static_compiled", static)
        # Ours' prefill alone (as the default call runs it), to split ours' time into the prompt and the decode steps.
        fns["ours_prefill"] = lambda: ours.generate(ids, max_new_tokens=1, eos_token_id=[])
        chains, prompt_chains, chain_info = decode_chain(ours, batch, ids, CHAIN_FORMS)
        for form, chain in chains.items():  # n steps' worth, timed alongside
            fns[f"chain_{form}"] = lambda chain=chain: [chain() for _ in range(n)]
        for form, chain in prompt_chains.items():
            fns[f"prompt_chain_{form}"] = chain
        log(f"decode batch {batch}: {n} new tokens (and the weights-only chain in {len(chains)} forms)")
        with torch.no_grad():  # at least one round per contender, so that each runs once after each other one
            times = time_interleaved(fns, max(args.iters, len(fns)), 1, device)
        tokens = batch * n
        same = {k: bool(torch.equal(v, outs["theirs"])) for k, v in outs.items() if k != "theirs"}
        t_theirs = median(times["theirs"])
        infos = []
        for form in chains:
            t_chain = median(times[f"chain_{form}"])
            infos.append(dict(chain_info, form=form, tokens_per_s=tokens / t_chain, seconds_per_step=t_chain / n,
                              weight_bytes_per_s=chain_info["weight_bytes"] * n / t_chain))
        bound = max(infos, key=lambda info: info["tokens_per_s"])
        t_prompt_chain = min(median(times[f"prompt_chain_{form}"]) for form in prompt_chains)
        generate_bound_tps = tokens / (t_prompt_chain + bound["seconds_per_step"] * (n - 1))
        t_prefill = median(times["ours_prefill"])
        for name, label in (("ours", "eager, dynamic cache"), ("ours_static_compiled",
                                                               "opt-in: static cache + compiled step")):
            row = f"decode_b{batch}" + ("" if name == "ours" else "_static_compiled")
            if name not in times:
                results.skip(row, f"decode tokens/s, batch {batch} ({label})", "--quick")
                continue
            tps = tokens / median(times[name])
            results.add(row, f"decode tokens/s, batch {batch} ({label})", tps, tokens / t_theirs, "tokens/s",
                        times={name: times[name], "theirs": times["theirs"]},
                        extra={"same_tokens_as_theirs": same.get(name), **({"compile_s": compile_s} if compile_s and
                                                                           name != "ours" else {})})
            split = {  # where ours' time goes, against the chains: the prompt, then each of the n - 1 decode steps
                "ours_prefill_s": t_prefill, "prompt_chain_s": t_prompt_chain,
                "ours_step_s": (median(times[name]) - t_prefill) / (n - 1), "chain_step_s": bound["seconds_per_step"],
                "prompt_weight_bytes": chain_info["prompt_weight_bytes"],
            }
            results.add(f"{row}_chain_share",
                        f"decode tokens/s as a share of the weights-only chain (the faster form), batch {batch} "
                        f"({label})", tps / bound["tokens_per_s"], (tokens / t_theirs) / bound["tokens_per_s"],
                        "share", ratio=tps / bound["tokens_per_s"],
                        extra={"chains": infos, "split": split} if name == "ours" else {"split": split})
            results.add(f"{row}_generate_chain_share",
                        f"decode tokens/s as a share of the chain with the prompt's products, batch {batch} ({label})",
                        tps / generate_bound_tps, (tokens / t_theirs) / generate_bound_tps, "share",
                        ratio=tps / generate_bound_tps)
    del ours, theirs
    gc.collect()


# ----------------------------------------------------------------------------- memory (fresh subprocesses)


def _status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training-step peak measurement in this (fresh) process: peak RSS minus RSS before the step."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    config = make_config(spec["preset"])
    B, T = PRESETS[spec["preset"]]["batch"], PRESETS[spec["preset"]]["seq"]
    torch.manual_seed(0)
    model = JetMoeForCausalLM(config).to(device).train()
    if spec["who"] == "theirs":
        model = hf_twin(model).train()
    if spec["grad_ckpt"]:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)
    step = train_step_fn(model, ids, adamw(model))
    step()  # warm-up: one-off allocations (thread pools, kernels' workspaces)
    gc.collect()
    result = _measure_step(step, device)
    del model, step
    gc.collect()
    return result


def _measure_step(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "method": "torch.cuda.max_memory_allocated"}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    base = _status_kib("VmRSS")
    step()
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024,
            "method": "peak RSS - RSS before the step (VmHWM after clear_refs), MALLOC_MMAP_THRESHOLD_=65536"}


def bench_memory(args, device, results) -> None:
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        for name in ("train_peak_memory", "grad_checkpointing_memory"):
            results.skip(name, name, "needs Linux /proc")
        return
    specs = {
        "ours": dict(who="ours", grad_ckpt=False),
        "theirs": dict(who="theirs", grad_ckpt=False),
        "ours_ckpt": dict(who="ours", grad_ckpt=True),
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    common = dict(preset=args.config, device=str(device), threads=torch.get_num_threads())
    # One fresh process per measurement; --quick measures all three in one process (one import instead of three).
    groups = [[name] for name in specs] if not args.quick else [list(specs)]
    log(f"peak training-step memory ({len(groups)} fresh subprocess(es))")
    procs = []
    for names in groups:
        payload = json.dumps([dict(specs[name], task="memory", **common) for name in names])
        cmd = [sys.executable, __file__, "--worker", payload]
        procs.append((names, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)))
    measured = {}
    for names, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed (exit code {proc.returncode})")
        measured.update(zip(names, json.loads(out.strip().splitlines()[-1])))
    mib = 2**20
    results.add("train_peak_memory", "peak memory of a training step (MiB, fp32; ratio = ours / theirs)",
                measured["ours"]["peak_bytes"] / mib, measured["theirs"]["peak_bytes"] / mib, "MiB",
                ratio=measured["ours"]["peak_bytes"] / measured["theirs"]["peak_bytes"],
                extra={"method": measured["ours"]["method"]})
    results.add("grad_checkpointing_memory",
                "peak memory with gradient checkpointing (MiB; ours with / ours without; theirs: unsupported)",
                measured["ours_ckpt"]["peak_bytes"] / mib, None, "MiB",
                ratio=measured["ours_ckpt"]["peak_bytes"] / measured["ours"]["peak_bytes"],
                extra={"ours_without_MiB": measured["ours"]["peak_bytes"] / mib,
                       "note": "transformers' JetMoe has supports_gradient_checkpointing = False"})


# ----------------------------------------------------------------------------- scaling


def throughput_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Consecutive training steps of one model in this (fresh) process: its steady state, the allocator holding
    only this model's buffers (interleaving models of very different sizes in one process would make each pay
    for the other's page faults)."""
    if spec["retain"]:
        retain_freed_memory()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    config = scaling_config(spec["preset"], spec["experts"], spec["forced"])
    B, T = PRESETS[spec["preset"]]["batch"], PRESETS[spec["preset"]]["seq"]
    torch.manual_seed(0)
    model = JetMoeForCausalLM(config).to(device).train()
    if spec["who"] == "theirs":
        model = hf_twin(model).train()
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)
    times = time_interleaved({"step": train_step_fn(model, ids)}, spec["iters"],
                             spec["warmup"], device)["step"]
    return {"times": times}


def bench_scaling(args, device, results) -> None:
    """Each (library, experts, host memory policy) in its own subprocess, one after the other; the target rows with
    glibc's default policy (what a plain training loop gets), ours also under `jetmoe train`'s policy. transformers'
    per-expert loop makes a step with many experts very slow (every expert's weight slice allocates a full-size
    gradient), so it gets one round, and one step without warm-up beyond 8 experts. Skipped under --quick."""
    if args.quick:
        results.skip("train_fp32_retained", TRAIN_RETAINED_LABEL, "--quick")
        for e in SCALING_EXPERTS[1:]:
            results.skip(f"scaling_{e}_experts", f"training tokens/s with {e} experts", "--quick")
        for e in SCALING_EXPERTS:
            results.skip(f"scaling_{e}_experts_forced", f"training tokens/s with {e} experts, forced routing", "--quick")
        return
    B, T = PRESETS[args.config]["batch"], PRESETS[args.config]["seq"]
    tokens = B * T
    tps: dict[int, dict[str, Any]] = {}

    def measure(who: str, experts: int, iters: int, warmup: int, retain: bool = False, forced: bool = False):
        policy = "retained" if retain else "default"
        log(f"scaling: {who}, {experts} experts, {policy} host memory{', forced routing' if forced else ''} "
            f"({warmup} warm-up + {iters} steps, fresh process)")
        spec = dict(task="throughput", who=who, experts=experts, preset=args.config, device=str(device),
                    threads=torch.get_num_threads(), iters=iters, warmup=warmup, retain=retain, forced=forced)
        return run_worker([spec])[0]["times"]

    for experts in SCALING_EXPERTS:
        config = scaling_config(args.config, experts)
        tps[experts] = {"total_params": config.num_parameters()["total"],
                        "active_params": config.num_parameters()["active"], "ours_times_s": []}
    for _ in range(2):  # two rounds, so that a burst of load on a shared machine does not hit one size only
        for experts in SCALING_EXPERTS:
            tps[experts]["ours_times_s"] += measure("ours", experts, max(1, args.iters - 1), 2)
    for experts in SCALING_EXPERTS:
        tps[experts]["ours_retained_times_s"] = measure("ours", experts, max(1, args.iters - 1), 2, retain=True)
        tps[experts]["ours_forced_times_s"] = measure("ours", experts, max(1, args.iters - 1), 2, forced=True)
    tps[8]["theirs_retained_times_s"] = measure("theirs", 8, max(1, args.iters - 1), 1, retain=True)
    for experts in SCALING_EXPERTS:
        iters, warmup = (1, 0) if experts > 8 else (max(1, args.iters - 1), 1)
        tps[experts]["theirs_times_s"] = measure("theirs", experts, iters, warmup)
        for who in ("ours", "ours_retained", "ours_forced", "theirs", "theirs_retained"):
            if f"{who}_times_s" in tps[experts]:
                tps[experts][who] = tokens / median(tps[experts][f"{who}_times_s"])
    # The 8-expert steps are the bench config's: its training ratio when both libraries keep freed memory.
    results.add("train_fp32_retained", TRAIN_RETAINED_LABEL, tps[8]["ours_retained"], tps[8]["theirs_retained"],
                "tokens/s")
    for experts in SCALING_EXPERTS[1:]:
        results.add(
            f"scaling_{experts}_experts",
            f"training tokens/s (forward + backward) with {experts} experts (ratio = ours vs ours with 8 experts)",
            tps[experts]["ours"], tps[experts]["theirs"], "tokens/s", ratio=tps[experts]["ours"] / tps[8]["ours"],
            extra={"theirs_vs_theirs_8": tps[experts]["theirs"] / tps[8]["theirs"], "per_experts": tps},
        )
    for experts in SCALING_EXPERTS:
        results.add(
            f"scaling_{experts}_experts_forced",
            f"training tokens/s with {experts} experts, routing forced uniform (ours; ratio = vs learned routing)",
            tps[experts]["ours_forced"], None, "tokens/s", ratio=tps[experts]["ours_forced"] / tps[experts]["ours"],
        )
    for experts in SCALING_EXPERTS[1:]:
        results.add(
            f"scaling_{experts}_experts_retained",
            f"training tokens/s with {experts} experts, opt-in: jetmoe train's host memory policy (ours; ratio = vs 8)",
            tps[experts]["ours_retained"], None, "tokens/s",
            ratio=tps[experts]["ours_retained"] / tps[8]["ours_retained"],
        )


def run_worker(specs: list[dict[str, Any]], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run `specs` in one fresh Python process (this file with --worker); returns their results in order."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(specs)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed (exit code {proc.returncode}): {specs}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- results


@dataclass
class Results:
    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    gemm: dict[str, Any] = field(default_factory=dict)

    def peak_for(self, dtype: torch.dtype) -> float | None:
        """The matmul peak MFU is measured against: for bf16, the better of the bf16 and fp32 GEMMs (on a CPU
        without bf16 units the fp32 GEMM is the faster way to do bf16 math, and ours uses it)."""
        if not self.gemm:
            return None
        fp32 = self.gemm["float32"]["flops_per_s"]
        return fp32 if dtype == torch.float32 else max(fp32, self.gemm["bfloat16"]["flops_per_s"])

    def add(self, name, label, ours, theirs, unit, ratio=None, times=None, extra=None) -> None:
        if ratio is None:
            ratio = ours / theirs if theirs else None
        target = TARGETS.get(name)
        met = None
        if target is not None and ratio is not None:
            met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
        row = {"name": name, "label": label, "ours": ours, "theirs": theirs, "unit": unit, "ratio": ratio,
               "target": None if target is None else f"{target[0]} {target[1]}", "met": met}
        if times:
            row["times_s"] = times
        if extra:
            row.update(extra)
        self.rows.append(row)
        log(f"  {label}: ours {fmt(ours)}  theirs {fmt(theirs)}  ratio {fmt(ratio)}"
            + ("" if met is None else f"  target {row['target']}: {'met' if met else 'NOT met'}"))

    def skip(self, name, label, reason) -> None:
        target = TARGETS.get(name)
        self.rows.append({"name": name, "label": label, "ours": None, "theirs": None, "unit": None, "ratio": None,
                          "target": None if target is None else f"{target[0]} {target[1]}", "met": None,
                          "skipped": reason})


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def to_markdown(results: Results) -> str:
    m = results.meta
    lines = [
        f"# JetMoE vs transformers: `{m['config']}` preset{' (--quick)' if m['quick'] else ''}",
        "",
        f"- machine: {m['machine']}, {m['threads']} torch threads; torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['date']}",
        f"- command: `{m['command']}`",
        f"- model: {m['model']}; batch {m['batch']} x {m['seq']} tokens; host memory policy (main process): "
        f"{m['host_memory']}",
        "",
        "| metric | ours | transformers | ratio | target | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in results.rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        if r.get("skipped"):
            met = f"skipped ({r['skipped']})"
        lines.append(f"| {r['label']} | {fmt(r['ours'])} | {fmt(r['theirs'])} | {fmt(r['ratio'])} | "
                     f"{r['target'] or '-'} | {met} |")
    extra = []
    for r in results.rows:
        if "mfu_ours" in r and r["mfu_ours"] is not None:
            theirs = r.get("mfu_theirs")
            extra.append(f"- MFU, {r['label']}: ours {100 * r['mfu_ours']:.0f}%"
                         + ("" if theirs is None else f", transformers {100 * theirs:.0f}%"))
        for c in r.get("chains", []):
            extra.append(f"- chain ({c['form']}), {r['label']}: {c['matmuls']} matmuls, "
                         f"{c['weight_bytes'] / 2**20:.0f} MiB of weights, {c['tokens_per_s']:.0f} tokens/s "
                         f"({c['weight_bytes_per_s'] / 1e9:.1f} GB/s), {c['mean_experts_touched_per_router']:.1f} "
                         "experts per router")
        if "split" in r:
            sp = r["split"]
            extra.append(f"- {r['label']}: ours' eager prefill {1e3 * sp['ours_prefill_s']:.1f} ms against its chain's "
                         f"{1e3 * sp['prompt_chain_s']:.1f} ms ({sp['prompt_weight_bytes'] / 2**20:.0f} MiB of "
                         f"weights); each decode step {1e3 * sp['ours_step_s']:.2f} ms against "
                         f"{1e3 * sp['chain_step_s']:.2f} ms")
        if r.get("same_tokens_as_theirs") is not None:
            extra.append(f"- {r['label']}: same tokens as transformers: {r['same_tokens_as_theirs']}")
        if "compile_s" in r:
            extra.append(f"- {r['label']}: first call (compilation) {r['compile_s']:.0f} s")
        if "theirs_vs_theirs_8" in r:
            extra.append(f"- {r['label']}: transformers vs its own 8-expert step: {r['theirs_vs_theirs_8']:.2f}")
        if "ours_without_MiB" in r:
            extra.append(f"- gradient checkpointing: ours {r['ours']:.0f} MiB with vs {r['ours_without_MiB']:.0f} MiB "
                         f"without; {r['note']}")
    if results.gemm:
        g = results.gemm
        extra.append(f"- GEMM peak (best of {', '.join(g['shapes'])}): fp32 {g['float32']['flops_per_s'] / 1e9:.0f} "
                     f"GFLOP/s, bf16 {g['bfloat16']['flops_per_s'] / 1e9:.0f} GFLOP/s")
    if m.get("out_of_memory"):
        extra.append(f"- skipped, out of memory: {', '.join(m['out_of_memory'])}")
    if "train_flops_per_step" in m:
        extra.append(f"- training FLOPs per step (matmuls, 3x forward): {m['train_flops_per_step'] / 1e9:.0f} GFLOP")
    if extra:
        lines += ["", *extra]
    lines += ["", "Methods: see the docstring of `bench/bench_vs_transformers.py`."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    return f"{model} ({os.cpu_count()} CPUs)"


def guard_out_of_memory(name: str, device: torch.device, results: Results, fn: Callable, *fn_args: Any) -> None:
    """`fn(*fn_args)`; if the device runs out of memory, `name` is skipped (named under the table) and the run goes
    on."""
    try:
        fn(*fn_args)
        return
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0]  # the exception (and the frames holding its tensors) dies here
    log(f"{name}: out of memory, skipped ({message})")
    results.meta.setdefault("out_of_memory", []).append(name)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_gemm(args, device, results) -> None:
    log("GEMM peak")
    preset = PRESETS[args.config]
    results.gemm = gemm_peak(device, make_config(args.config), preset["batch"], preset["seq"], args.iters)


SECTIONS = {"gemm": bench_gemm, "train": bench_training, "decode": bench_decode, "memory": bench_memory,
            "scaling": bench_scaling}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--quick", action="store_true", help="1 timed iteration, short decode, no compiled rows")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 3, --quick 1)")
    p.add_argument("--train-iters", type=int, default=None,
                   help="timed iterations of the eager fp32 training and forward rows (default 5, --quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--publish", action="store_true", help="also write the markdown to bench/RESULTS.md")
    p.add_argument("--retain-host-memory", action="store_true",
                   help="run the main process under `jetmoe train`'s host memory policy (both libraries)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 1 if args.quick else 3
    if args.train_iters is None:
        args.train_iters = 1 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        workers = {"memory": memory_worker, "throughput": throughput_worker}
        print(json.dumps([workers[spec["task"]](spec) for spec in json.loads(args.worker)]))
        return 0
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_host_memory:
        retain_freed_memory()
    if args.config == "gpu" and not torch.cuda.is_available():
        log("--config gpu needs CUDA")
        return 2
    device = torch.device("cuda" if args.config == "gpu" else "cpu")
    preset = PRESETS[args.config]
    results = Results(meta={
        "config": args.config, "quick": args.quick, "machine": machine_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "model": asdict(make_config(args.config)),
        "batch": preset["batch"], "seq": preset["seq"], "iters": args.iters,
        "host_memory": "retained" if args.retain_host_memory else "glibc default",
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]]),
    })
    results.meta["model"] = ", ".join(f"{k}={v}" for k, v in preset["model"].items())
    sections = set(args.sections.split(","))
    start = time.perf_counter()
    for name, run in SECTIONS.items():
        if name in sections:
            guard_out_of_memory(name, device, results, run, args, device, results)
    results.meta["wall_s"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": results.meta, "rows": results.rows, "gemm_peak": results.gemm}
    (args.out_dir / "latest.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    markdown = to_markdown(results)
    (args.out_dir / "latest.md").write_text(markdown)
    if args.publish:
        (BENCH_DIR / "RESULTS.md").write_text(markdown)
    print(markdown)
    log(f"done in {results.meta['wall_s']:.0f} s; wrote {args.out_dir / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
