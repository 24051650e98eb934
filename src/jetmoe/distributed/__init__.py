"""Sharded training of JetMoE with FSDP2 (torch.distributed.fsdp.fully_shard), for Lightning or plain loops.

    parallelize_jetmoe(model, mesh, ...)      activation checkpointing -> compile -> fully_shard per block, root
    materialize(model, device)                to_empty + tie_weights + init equal to the unsharded init
    build_sharded_causal_lm(config, mesh, device, ...)   meta build + parallelize + materialize
    consolidate(sharded_dir, out_dir, config) one HF-format directory from a sharded checkpoint
    save_hf / full_state_dict / load_hf_weights   HF export and import under FSDP
    estimate / format_plan                    memory and throughput plan (jetmoe.distributed.plan)
    expert_parallel_mesh(device, degree)      the (expert_data_parallel, expert_parallel) mesh of expert parallelism
    clip_grad_norm_ / total_norm              gradient norms over DTensors on several meshes (expert parallelism)

The Lightning strategy lives in `jetmoe.distributed.strategy.FSDP2Strategy` (imported on its own, so that
this package does not import Lightning). See docs/distributed.md.
"""

from jetmoe.distributed.clip import clip_grad_norm_, total_norm
from jetmoe.distributed.checkpoint import (
    consolidate,
    full_state_dict,
    load_hf_weights,
    resolve_checkpoint,
    save_hf,
)
from jetmoe.distributed.parallelize import (
    build_sharded_causal_lm,
    init_weights,
    materialize,
    mixed_precision_policy,
    parallelize_jetmoe,
)
from jetmoe.distributed.mesh import expert_parallel_mesh
from jetmoe.distributed.plan import estimate, format_plan

__all__ = [
    "build_sharded_causal_lm",
    "clip_grad_norm_",
    "consolidate",
    "estimate",
    "expert_parallel_mesh",
    "format_plan",
    "full_state_dict",
    "init_weights",
    "load_hf_weights",
    "materialize",
    "mixed_precision_policy",
    "parallelize_jetmoe",
    "resolve_checkpoint",
    "save_hf",
    "total_norm",
]
