"""The norm of gradients held as DTensors on several device meshes, and clipping by it.

`torch.nn.utils.clip_grad_norm_` stacks the per-tensor norms, which fails for DTensors on different meshes: under
expert parallelism the expert weights live on the (expert_data_parallel, expert_parallel) mesh and the rest on the
data-parallel mesh. Here each mesh's tensors are reduced to one norm over that mesh (a collective), and the
per-mesh norms combined on every rank alike. Plain tensors (one process, or DDP) take torch's own path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def total_norm(tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type`-norm of all `tensors` together (a plain 0-d tensor, the same on every rank). Collective
    when some are DTensors: call it on every rank."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        by_mesh.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale the gradients of `parameters` so that their total norm is at most `max_norm` (as
    `torch.nn.utils.clip_grad_norm_`, for gradients on any mix of meshes); returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = total_norm(grads, norm_type)
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:  # every shard scales alike: scale the local tensors
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient.to(grad.device))
    return norm
