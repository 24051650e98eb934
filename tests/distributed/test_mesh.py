"""The expert-parallel mesh: its dims, and the errors of a degree that the launch cannot give."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from jetmoe.distributed.mesh import data_parallel_mesh, expert_meshes, expert_parallel_mesh
from jetmoe.errors import ConfigError, UserError


def test_expert_parallelism_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(UserError, match=r"trainer_ep=2 needs a distributed launch .* not initialised"):
        expert_parallel_mesh("cpu", 2, name="trainer_ep")


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_degree_must_divide_the_ranks(one_rank):
    with pytest.raises(ConfigError, match=r"^expert_parallel \(2\) must divide the number of ranks \(1\)$"):
        expert_parallel_mesh("cpu", 2)
    with pytest.raises(ConfigError, match=r"^expert_parallel must be >= 1, got 0$"):
        expert_parallel_mesh("cpu", 0)


def test_degree_one_is_plain_fsdp_over_every_rank(one_rank):
    mesh = expert_parallel_mesh("cpu", 1)
    assert mesh.mesh_dim_names == ("expert_data_parallel", "expert_parallel")
    assert expert_meshes(mesh) is None  # nothing to split the experts over
    assert data_parallel_mesh(mesh).mesh_dim_names == ("data_parallel",)
    assert data_parallel_mesh(mesh) is data_parallel_mesh(mesh)  # flattened once
