"""FSDP2 for JetMoE: activation checkpointing -> torch.compile -> fully_shard, per decoder block, then the root.

Meta-device flow (what `build_sharded_causal_lm` does and what a Lightning `configure_model` does)::

    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    model = parallelize_jetmoe(model, device_mesh, precision="bf16-mixed", activation_checkpointing="full")
    materialize(model, device)       # to_empty + tie_weights + init_weights, equal to the unsharded init

Every decoder block is its own FSDP unit (all-gathered just before it runs, resharded after); the root unit
holds the embeddings, the tied LM head and the final norm, so a tied head stays one parameter under sharding.

On an expert-parallel mesh (`jetmoe.distributed.mesh.expert_parallel_mesh`) the expert weights are first split by
expert over "expert_parallel" (`expert_parallel.shard_experts`); each block's FSDP unit then shards them over
"expert_data_parallel" and everything else over all ranks (one `fully_shard` per block, per-parameter meshes).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from jetmoe.config import PRECISIONS, JetMoeConfig
from jetmoe.distributed.expert_parallel import average_gradients_over, expert_shard_placement, shard_experts
from jetmoe.distributed.mesh import data_parallel_mesh, expert_meshes
from jetmoe.errors import check_choice
from jetmoe.model import JetMoeForCausalLM, JetMoePreTrainedModel, init_module_weights

Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
ActivationCheckpointing = Literal["none", "full", "selective"]
ACTIVATION_CHECKPOINTING: tuple[str, ...] = ("none", "full", "selective")


def parallelize_jetmoe(
    model: JetMoePreTrainedModel,
    device_mesh: DeviceMesh,
    *,
    activation_checkpointing: ActivationCheckpointing = "none",
    compile: bool = False,
    precision: Precision = "32-true",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    expert_parallel_attention: bool = False,
) -> JetMoePreTrainedModel:
    """Shard `model` (ideally still on the meta device) over the data-parallel ranks of `device_mesh`.

    `device_mesh` is 1-D, Lightning's 2-D ("data_parallel", "tensor_parallel") mesh with tensor_parallel
    size 1, or an expert-parallel mesh (`mesh.expert_parallel_mesh`): then the MoE experts, and the MoA experts
    with `expert_parallel_attention`, are split by expert over its "expert_parallel" dim.
    `activation_checkpointing`: "full" recomputes every decoder block in backward, "selective" every
    other block (blocks 0, 2, 4, ...: half of full's activation saving for half of its recomputation).
    `precision` "bf16-mixed" keeps fp32 sharded (master) parameters and runs blocks with bf16 copies, reducing
    gradients in fp32; "bf16-true" stores the parameters in bf16. Returns `model` (sharded in place).
    """
    check_choice("activation_checkpointing", activation_checkpointing, ACTIVATION_CHECKPOINTING)
    check_choice("precision", precision, PRECISIONS)
    if activation_checkpointing != "none" and model.base_model.gradient_checkpointing:
        raise ValueError(
            "the model's gradient_checkpointing is on as well: use either gradient_checkpointing_enable() "
            "or parallelize_jetmoe(activation_checkpointing=...), not both"
        )
    mesh = data_parallel_mesh(device_mesh)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    experts = expert_meshes(device_mesh)
    placement = None
    if experts:
        expert_data_mesh, ep_mesh = experts
        expert_params = shard_experts(model, ep_mesh, expert_parallel_attention)
        placement = expert_shard_placement(expert_params, expert_data_mesh)
    layers = model.base_model.layers
    for i, block in enumerate(layers):
        if activation_checkpointing == "full" or (activation_checkpointing == "selective" and i % 2 == 0):
            block = checkpoint_wrapper(block)  # non-reentrant torch.utils.checkpoint
        if compile:
            block = torch.compile(block)
        layers[i] = block
    shard_kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(precision), offload_policy=_offload(cpu_offload))
    for block in layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, shard_placement_fn=placement, **shard_kwargs)
        if experts:
            average_gradients_over(block, mesh, expert_data_mesh)
    fully_shard(model, **shard_kwargs)  # embeddings, (tied) LM head, final norm
    return model


def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction for "bf16-mixed"; no casting otherwise."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _offload(cpu_offload: bool) -> OffloadPolicy:
    """Sharded parameters, gradients and the optimizer step on the host (pinned memory where CUDA exists)."""
    if not cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- meta-device initialisation


def materialize(model: JetMoePreTrainedModel, device: torch.device | str) -> None:
    """Allocate a meta-built (sharded or not) model on `device` and initialise it: `to_empty`, `tie_weights`,
    then `init_weights` drawing exactly the numbers the unsharded model draws from the same RNG state.

    With `cpu_offload`, pass device="cpu" (FSDP2 keeps the sharded parameters on the host)."""
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model)
    model.reset_buffers()



@torch.no_grad()
def init_weights(model: JetMoePreTrainedModel) -> None:
    """`model.init_weights()` for a model whose parameters may be FSDP shards (DTensors).

    DTensor random ops on CPU draw every shard from the rank-local generator, so shards would repeat each
    other. Instead, module by module in `model.modules()` order (the order of `init_weights`), each rank
    initialises full-size tensors with the model's own code and keeps its shard: all ranks draw the same
    sequence as one unsharded model, and memory peaks at one module's full parameters.
    """
    done: set[int] = set()  # a tied weight is initialised once, as `init_weights` does
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if not params or all(id(p) in done for p in params.values()):
            continue
        done.update(id(p) for p in params.values())
        full = {name: torch.empty(p.shape, dtype=p.dtype, device=_local(p).device) for name, p in params.items()}
        _init_one_module(model, module, full)
        for name, p in params.items():
            _local(p).copy_(_local_shard(full[name], p))


def _init_one_module(model: JetMoePreTrainedModel, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """`init_module_weights` on `module` alone, with `full` standing in for its parameters."""
    originals = dict(module._parameters)
    module._parameters.update({name: nn.Parameter(t, requires_grad=False) for name, t in full.items()})
    try:
        init_module_weights(module, model.config.initializer_range)
    finally:
        module._parameters.update(originals)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` under `like`'s placements (no communication: every rank holds `full`)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def build_sharded_causal_lm(
    config: JetMoeConfig,
    device_mesh: DeviceMesh,
    device: torch.device | str,
    **parallelize_kwargs,
) -> JetMoeForCausalLM:
    """Meta-build a `JetMoeForCausalLM`, `parallelize_jetmoe` it, then `materialize` it on `device` (the host
    when `cpu_offload=True`). Seed the RNG identically on every rank first (Lightning's `seed_everything`)."""
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    parallelize_jetmoe(model, device_mesh, **parallelize_kwargs)
    materialize(model, "cpu" if parallelize_kwargs.get("cpu_offload") else device)
    return model
