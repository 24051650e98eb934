"""Sharded (FSDP2) JetMoE and the Hugging Face format: gathering shards into an HF export, loading HF weights into
shards, and consolidating a sharded checkpoint (a torch.distributed.checkpoint directory written by Lightning's
`ModelParallelStrategy`, see `strategy.FSDP2Strategy`) into one HF directory.

A sharded checkpoint is written to a hidden sibling `.NAME.tmp` that replaces `NAME` once every rank has written its
shard (`jetmoe.files.replace_dir`): an interrupted save leaves the previous checkpoint intact, and a crash between the
two renames leaves `.NAME.old`, which `resolve_checkpoint` falls back to. The directory must be on a filesystem
every rank sees.

Collective functions (call them on every rank): `full_state_dict`, `save_hf`, `load_hf_weights`. `consolidate` runs
in one process, without a process group.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule

from jetmoe import hf_io
from jetmoe.config import JetMoeConfig
from jetmoe.errors import InputFileError, MissingFileError, UserError
from jetmoe.files import resolve_dir
from jetmoe.model import JetMoeForCausalLM, JetMoePreTrainedModel

EMBED_KEY, HEAD_KEY = "model.embed_tokens.weight", "lm_head.weight"


def resolve_checkpoint(directory: str | Path) -> Path:
    """`directory`, or its `.NAME.old` backup when a save died between the two renames of `files.replace_dir`."""
    found = resolve_dir(directory)
    if found is None:  # name the checkpoints there are (a mistyped --checkpoint)
        others = ", ".join(sorted(p.name for p in Path(directory).parent.glob("*.ckpt")))
        raise MissingFileError(f"{directory}: no such checkpoint{f' (found: {others})' if others else ''}")
    return found


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- full weights and HF format


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the gathered (unsharded) model state dict on rank 0, in host memory; `{}` on other ranks.
    Keys are the plain module names (no checkpoint-wrapper or compile prefixes)."""
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    redistribute_log.addFilter(_one_gather_per_mesh_dim)
    try:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        redistribute_log.removeFilter(_one_gather_per_mesh_dim)


def _one_gather_per_mesh_dim(record: logging.LogRecord) -> bool:
    """Drop DTensor's note that an expert-parallel weight (sharded over both dims of its 2-D mesh) is gathered by
    two all-gathers: expected, once per weight and rank."""
    return not record.getMessage().startswith("While redistributing from")


def save_hf(model: JetMoePreTrainedModel, directory: str | Path) -> None:
    """Collective: gather the sharded `model` and write `config.json` + `model.safetensors` from rank 0
    (what `model.save_pretrained` does for an unsharded model)."""
    state_dict = full_state_dict(model)
    if _rank() == 0:
        hf_io.write_checkpoint(directory, model.config, state_dict, _architecture(model))
    _barrier()


def _architecture(model: nn.Module) -> str:
    """The model's own class name (FSDP2 swaps in a subclass called `FSDP<name>`)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def load_hf_weights(model: JetMoeForCausalLM, directory: str | Path) -> None:
    """Collective: load an HF-format checkpoint (e.g. `trainer.init_from`) into a materialised sharded model.
    Rank 0 reads the file and broadcasts each tensor; every rank keeps its shard."""
    expected_state = get_model_state_dict(model)
    expected = set(expected_state)
    state_dict, error = {}, None
    if _rank() == 0:
        state_dict = hf_io.with_selection_biases(hf_io.load_state_dict(directory), expected_state)
        if model.config.tie_word_embeddings and EMBED_KEY in state_dict:
            state_dict[HEAD_KEY] = state_dict[EMBED_KEY]
        missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
        if missing or unexpected:
            error = (f"{directory}: checkpoint does not match the model: "
                     f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    error = _broadcast(error)
    if error:
        raise InputFileError(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, state_dict, options=options)


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def consolidate(sharded_dir: str | Path, out_dir: str | Path, config: JetMoeConfig) -> None:
    """Turn a sharded checkpoint into one HF-format directory (`config.json` + `model.safetensors`) that
    `transformers.JetMoeForCausalLM.from_pretrained` loads. One process, no process group; reads only the
    model tensors (not the optimizer state) of a Lightning `FSDP2Strategy` checkpoint (a `last.ckpt/` directory)."""
    path = resolve_checkpoint(sharded_dir)
    if not path.is_dir():  # Lightning's single-file checkpoint: its run exported its HF weights itself
        export = path.parent.parent / "hf" if path.parent.name == "checkpoints" else "the run directory's hf/"
        raise InputFileError(
            f"{path}: a single-file checkpoint, of a run without trainer.strategy=fsdp; consolidate expects a sharded "
            f"checkpoint directory. Such a run's HF export is already in {export}"
        )
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    wanted = {key: tensor for key, tensor in model.state_dict().items()
              if not (config.tie_word_embeddings and key == HEAD_KEY)}
    prefix = _model_prefix(path)
    check_tensor_shapes(path, {key: tensor.shape for key, tensor in wanted.items()}, prefix)
    wanted = {prefix + key: tensor for key, tensor in wanted.items()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(wanted, checkpoint_id=path, no_dist=True)  # fills the model's tensors in place
        except CheckpointException as err:  # a BaseException, carrying each rank's (exception, traceback)
            raise _unreadable_shard(path, next(iter(err.failures.values()))[0]) from None
    hf_io.write_checkpoint(out_dir, config, model.state_dict(), type(model).__name__)


def _unreadable_shard(path: Path, err: BaseException) -> UserError:
    """The one-line error for a shard file DCP could not read: missing, or truncated (an interrupted copy)."""
    if isinstance(err, FileNotFoundError):
        return MissingFileError(f"{err.filename}: shard file not found (the checkpoint {path} is incomplete)")
    reason = str(err).split(". ")[0] or type(err).__name__  # torch's first sentence says what failed
    return InputFileError(f"{path}: a shard file (*.distcp) cannot be read ({reason}): expected the complete files "
                          "of a sharded save (a truncated copy?)")


def check_tensor_shapes(path: Path, expected: dict[str, torch.Size], prefix: str = "") -> None:
    """Before a DCP load: every tensor of `expected` (global shapes) is in the checkpoint at `path` under
    `prefix` + its name with that global shape, else an InputFileError naming the first that is not. DCP reshards a
    tensor to any sharding of the same global shape (another number of ranks, another expert-parallel degree),
    never to another shape (another expert count or width)."""
    stored = _metadata(path)
    for key, shape in expected.items():
        if prefix + key not in stored:
            raise InputFileError(f"{path}: the checkpoint holds no {key} (not a checkpoint of this model)")
        found = list(getattr(stored[prefix + key], "size", ()))
        if found != list(shape):
            raise InputFileError(
                f"{path}: {key} is {found} in the checkpoint but {list(shape)} in the model: a checkpoint loads at "
                "any number of ranks and any expert_parallel degree, not into another expert count or size"
            )


def _metadata(path: Path) -> dict[str, Any]:
    """The tensors a sharded checkpoint holds, from its `.metadata` (the file a sharded save writes last)."""
    file = path / ".metadata"
    if not file.is_file():
        raise MissingFileError(f"{file}: not found (expected a sharded checkpoint directory, as "
                               "trainer.strategy=fsdp writes; an interrupted copy?)")
    try:
        return dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, EOFError) as err:
        raise InputFileError(f"{file}: not a readable checkpoint index ({err or type(err).__name__}): truncated or "
                             "damaged") from None


def _model_prefix(path: Path) -> str:
    """Where the model sits in a DCP checkpoint ("state_dict.model." in Lightning's)."""
    prefixes = {key.removesuffix(EMBED_KEY) for key in _metadata(path) if key.endswith(EMBED_KEY)}
    if len(prefixes) != 1:
        raise InputFileError(f"{path}: expected one model in the checkpoint, found {len(prefixes)} ({sorted(prefixes)})")
    return prefixes.pop()
