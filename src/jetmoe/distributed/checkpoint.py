"""Sharded checkpoints of an FSDP2 JetMoE (torch.distributed.checkpoint) and HF-format exports.

A sharded checkpoint is a DCP directory: one `__<rank>_0.distcp` file per rank, `.metadata`, and our
`extra.json`. Saves go to a hidden sibling `.NAME.tmp` that replaces `NAME` once every rank has written its
shard, so an interrupted save leaves the previous checkpoint intact. The replacement is two renames
(`NAME` -> `.NAME.old`, `.NAME.tmp` -> `NAME`); a crash between them leaves `.NAME.old`, which
`resolve_checkpoint` falls back to. The directory must be on a filesystem every rank sees.

Collective functions (call them on every rank): `save_sharded`, `load_sharded`, `full_state_dict`,
`save_hf`, `load_hf_weights`. `consolidate` runs in one process, without a process group.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from jetmoe import hf_io
from jetmoe.config import JetMoeConfig
from jetmoe.model import JetMoeForCausalLM, JetMoePreTrainedModel

MODEL_KEY, OPTIM_KEY, EXTRA_FILE = "model", "optim", "extra.json"
EMBED_KEY, HEAD_KEY = "model.embed_tokens.weight", "lm_head.weight"


# ----------------------------------------------------------------------------- atomic directories


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete directory `tmp` to `final`, replacing it; `final`'s old content survives as
    `.NAME.old` until the new one is in place (see `resolve_checkpoint`). Call on one rank only."""
    tmp, final = Path(tmp), Path(final)
    old = hidden_sibling(final, "old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(directory: str | Path) -> Path:
    """`directory`, or its `.NAME.old` backup when a save died between the two renames of `replace_dir`."""
    directory = Path(directory)
    if directory.exists():
        return directory
    if hidden_sibling(directory, "old").is_dir():
        return hidden_sibling(directory, "old")
    raise FileNotFoundError(f"{directory}: no such checkpoint")


def hidden_sibling(path: Path, tag: str) -> Path:
    """`.NAME.tag` beside `path`: where saves write (`tmp`) and where the previous checkpoint waits (`old`)."""
    return path.with_name(f".{path.name}.{tag}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- sharded save / load


def save_sharded(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None
) -> None:
    """Collective: write every rank's model and optimizer shards (and the JSON-serialisable `extra`, e.g. the
    step) to `directory`, atomically replacing a previous checkpoint there."""
    directory = Path(directory)
    tmp = hidden_sibling(directory, "tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that died
        directory.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}, checkpoint_id=tmp)
    if _rank() == 0:
        (tmp / EXTRA_FILE).write_text(json.dumps(extra or {}))
    _barrier()  # every shard and .metadata are on disk
    if _rank() == 0:
        replace_dir(tmp, directory)
    _barrier()


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: load a `save_sharded` checkpoint into an already parallelized `model` and its `optimizer`
    (same parameter set; the number of ranks may differ). Returns the saved `extra`."""
    path = resolve_checkpoint(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY])
    extra = path / EXTRA_FILE
    return json.loads(extra.read_text()) if extra.is_file() else {}


# ----------------------------------------------------------------------------- full weights and HF format


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the gathered (unsharded) model state dict on rank 0, in host memory; `{}` on other ranks.
    Keys are the plain module names (no checkpoint-wrapper or compile prefixes)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model: JetMoePreTrainedModel, directory: str | Path) -> None:
    """Collective: gather the sharded `model` and write `config.json` + `model.safetensors` from rank 0
    (what `model.save_pretrained` does for an unsharded model)."""
    state_dict = full_state_dict(model)
    if _rank() == 0:
        hf_io.save_checkpoint(directory, model.config, state_dict, _architecture(model))
    _barrier()


def _architecture(model: nn.Module) -> str:
    """The model's own class name (FSDP2 swaps in a subclass called `FSDP<name>`)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def load_hf_weights(model: JetMoeForCausalLM, directory: str | Path) -> None:
    """Collective: load an HF-format checkpoint (e.g. `trainer.init_from`) into a materialised sharded model.
    Rank 0 reads the file and broadcasts each tensor; every rank keeps its shard."""
    expected = set(get_model_state_dict(model))
    state_dict, error = {}, None
    if _rank() == 0:
        state_dict = hf_io.load_state_dict(directory)
        if model.config.tie_word_embeddings and EMBED_KEY in state_dict:
            state_dict[HEAD_KEY] = state_dict[EMBED_KEY]
        missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
        if missing or unexpected:
            error = (f"{directory}: checkpoint does not match the model: "
                     f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    error = _broadcast(error)
    if error:
        raise ValueError(error)
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
    model tensors (not the optimizer state). Accepts `save_sharded` checkpoints and Lightning
    `ModelParallelStrategy` / `FSDP2Strategy` checkpoints (`last.ckpt/` directories)."""
    path = resolve_checkpoint(sharded_dir)
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    prefix = _model_prefix(path)
    wanted = {
        prefix + key: tensor for key, tensor in model.state_dict().items()
        if not (config.tie_word_embeddings and key == HEAD_KEY)
    }
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, checkpoint_id=path, no_dist=True)  # fills the model's tensors in place
    hf_io.save_checkpoint(out_dir, config, model.state_dict(), type(model).__name__)


def _model_prefix(path: Path) -> str:
    """Where the model sits in a DCP checkpoint: "model." (save_sharded) or "state_dict.model." (Lightning)."""
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    prefixes = {key.removesuffix(EMBED_KEY) for key in keys if key.endswith(EMBED_KEY)}
    if len(prefixes) != 1:
        raise ValueError(f"{path}: expected one model in the checkpoint, found {len(prefixes)} ({sorted(prefixes)})")
    return prefixes.pop()
