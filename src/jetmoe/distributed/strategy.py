"""`FSDP2Strategy`: Lightning's ModelParallelStrategy, sharding over every rank, with atomic checkpoints.

Lightning's `ModelParallelStrategy` builds a 2-D ("data_parallel", "tensor_parallel") device mesh whose sizes
default to (nodes, devices per node), i.e. tensor parallelism inside a node. JetMoE uses FSDP only, so this
subclass defaults to (world size, 1). It runs on CPU with gloo as well (Lightning does not refuse CPU), which
is how the tests exercise it. The LightningModule applies the sharding in `configure_model` with
`jetmoe.distributed.parallelize_jetmoe(model, self.device_mesh, ...)`.

With `expert_parallel=P` > 1 the LightningModule gets the 2-D (expert_data_parallel, expert_parallel) mesh of
`jetmoe.distributed.mesh` instead, on which `parallelize_jetmoe` splits the experts over groups of P ranks; every
rank stays data-parallel (its own micro-batch).

Precision belongs to FSDP2 here: give the run's precision to `parallelize_jetmoe` (a `MixedPrecisionPolicy`)
and leave the Trainer at `precision="32-true"`; Lightning's autocast or bf16 module conversion on top of
sharded parameters is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.optim import Optimizer

from jetmoe.distributed.checkpoint import check_tensor_shapes, resolve_checkpoint
from jetmoe.distributed.clip import clip_grad_norm_
from jetmoe.distributed.mesh import expert_parallel_mesh
from jetmoe.files import hidden_sibling, replace_dir


class ShardedGradientsPrecision(Precision):
    """Lightning's plugin of `precision="32-true"`, whose gradient clipping by norm also takes gradients sharded on
    several device meshes (`jetmoe.distributed.clip`): torch's stacks the per-mesh norms, which fails under
    expert parallelism."""

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_norm_(self.main_params(optimizer), clip_val)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (`data_parallel_size` = world size, `tensor_parallel_size` = 1), with experts split over
    groups of `expert_parallel` ranks; sharded checkpoint directories are written to a temporary sibling and
    renamed into place, and checked against the model before they are loaded."""

    def __init__(self, expert_parallel: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        kwargs.setdefault("save_distributed_checkpoint", True)
        super().__init__(**kwargs)
        self.expert_parallel = expert_parallel

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        if self.expert_parallel > 1:
            self._device_mesh = expert_parallel_mesh(self.root_device.type, self.expert_parallel)
            self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}  # every rank trains on its own data

    def setup(self, trainer: pl.Trainer) -> None:
        if type(self.precision_plugin) not in (Precision, ShardedGradientsPrecision):
            raise ValueError(
                f"{type(self).__name__} needs Trainer(precision='32-true'): pass the run's precision to "
                "parallelize_jetmoe(..., precision=...) instead (FSDP2 mixed precision)"
            )
        self.precision_plugin = ShardedGradientsPrecision()
        super().setup(trainer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        tmp = hidden_sibling(path, "tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that died
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every shard, .metadata and meta.pt are written
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = resolve_checkpoint(checkpoint_path)
        if path.is_dir():  # a sharded checkpoint: Lightning stores the module's state under "state_dict."
            shapes = {key: t.shape for key, t in get_model_state_dict(self.model).items()}
            check_tensor_shapes(path, shapes, prefix="state_dict.")
        return super().load_checkpoint(path, weights_only=weights_only)
