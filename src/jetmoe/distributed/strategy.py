"""`FSDP2Strategy`: Lightning's ModelParallelStrategy, sharding over every rank, with atomic checkpoints.

Lightning's `ModelParallelStrategy` builds a 2-D ("data_parallel", "tensor_parallel") device mesh whose sizes
default to (nodes, devices per node), i.e. tensor parallelism inside a node. JetMoE uses FSDP only, so this
subclass defaults to (world size, 1). It runs on CPU with gloo as well (Lightning does not refuse CPU), which
is how the tests exercise it. The LightningModule applies the sharding in `configure_model` with
`jetmoe.distributed.parallelize_jetmoe(model, self.device_mesh, ...)`.

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

from jetmoe.distributed.checkpoint import resolve_checkpoint
from jetmoe.files import hidden_sibling, replace_dir


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (`data_parallel_size` = world size, `tensor_parallel_size` = 1); sharded
    checkpoint directories are written to a temporary sibling and renamed into place."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        kwargs.setdefault("save_distributed_checkpoint", True)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        if type(self.precision_plugin) is not Precision:
            raise ValueError(
                f"{type(self).__name__} needs Trainer(precision='32-true'): pass the run's precision to "
                "parallelize_jetmoe(..., precision=...) instead (FSDP2 mixed precision)"
            )
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
        return super().load_checkpoint(resolve_checkpoint(checkpoint_path), weights_only=weights_only)
