"""The device meshes of a sharded JetMoE run.

Without expert parallelism FSDP2 shards every parameter over one 1-D mesh of all W ranks (or over the
"data_parallel" dim of Lightning's ("data_parallel", "tensor_parallel" = 1) mesh). With expert parallelism of
degree P the same W ranks also form a 2-D mesh::

    ("expert_data_parallel", "expert_parallel") = (W / P, P)     rank r = i·P + g: EP rank g of EP group i

An EP group is P consecutive ranks, i.e. GPUs of one node when P divides the GPUs per node: the all-to-all
stays on the node's fast links. Every rank is still data-parallel (it trains on its own micro-batch); the
non-expert parameters are sharded over all W ranks (the flattened "data_parallel" mesh), the expert weights
by expert index over "expert_parallel" and by FSDP over "expert_data_parallel" (torchtitan's composition,
see `jetmoe.distributed.expert_parallel`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from jetmoe.errors import ConfigError, UserError, divisor_problem

DATA, EXPERT_DATA, EXPERT = "data_parallel", "expert_data_parallel", "expert_parallel"
TENSOR = "tensor_parallel"  # Lightning's ModelParallelStrategy mesh: (data_parallel, tensor_parallel)


def check_expert_parallel(
    degree: int, *, ranks: int | None = None, ranks_name: str = "the number of ranks", experts: int | None = None,
    name: str = "expert_parallel",
) -> None:
    """ConfigError unless the expert-parallel `degree` is >= 1 and divides `ranks` and `experts` (those given);
    `name` and `ranks_name` are how the caller's user spells them."""
    if degree < 1:
        raise ConfigError(f"{name} must be >= 1, got {degree}")
    for total_name, total in ((ranks_name, ranks), ("num_local_experts", experts)):
        problem = None if total is None else divisor_problem(name, degree, total_name, total)
        if problem:
            raise ConfigError(problem)


def expert_parallel_mesh(device_type: str, expert_parallel: int, name: str = "expert_parallel") -> DeviceMesh:
    """The 2-D (expert_data_parallel, expert_parallel) mesh of every rank of the initialised process group;
    `name` is how the caller's user spells the degree (in errors)."""
    check_expert_parallel(expert_parallel, name=name)
    if not dist.is_initialized():
        raise UserError(
            f"{name}={expert_parallel} needs a distributed launch (`jetmoe train trainer.strategy=fsdp "
            "trainer.devices=N`, torchrun or SLURM): torch.distributed is not initialised"
        )
    world = dist.get_world_size()
    check_expert_parallel(expert_parallel, ranks=world, name=name)
    return init_device_mesh(device_type, (world // expert_parallel, expert_parallel),
                            mesh_dim_names=(EXPERT_DATA, EXPERT))


def data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of all data-parallel ranks, which FSDP shards the non-expert parameters over: `device_mesh`
    itself when 1-D, the flattened expert mesh, or the "data_parallel" dim of Lightning's mesh."""
    names = device_mesh.mesh_dim_names or ()
    if device_mesh.ndim == 1:
        return device_mesh
    if names == (EXPERT_DATA, EXPERT):
        return device_mesh._flatten(DATA)  # created once, then the same mesh object
    if names == (DATA, TENSOR) and device_mesh[TENSOR].size() == 1:
        return device_mesh[DATA]
    raise ValueError(
        f"expected a 1-D mesh, a ({EXPERT_DATA}, {EXPERT}) mesh or a ({DATA}, {TENSOR}=1) mesh, got shape "
        f"{tuple(device_mesh.shape)} with dims {names}: tensor parallelism is not supported (use "
        "jetmoe.distributed.strategy.FSDP2Strategy, which shards over all ranks)"
    )


def expert_meshes(device_mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh] | None:
    """(expert_data_parallel, expert_parallel) sub-meshes of an expert-parallel mesh, None for any other mesh (or
    an expert-parallel degree of 1)."""
    if (device_mesh.mesh_dim_names or ()) != (EXPERT_DATA, EXPERT) or device_mesh[EXPERT].size() == 1:
        return None
    return device_mesh[EXPERT_DATA], device_mesh[EXPERT]
