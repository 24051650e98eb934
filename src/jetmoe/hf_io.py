"""Checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` with transformers' JetMoe key names.

Module names in `jetmoe.model` are those of transformers, so the key adapter is the identity apart from the
tied LM head (not stored, as transformers does) and the `model.` prefix between base and task models.
Nothing here unpickles arbitrary objects: weights come from safetensors, or `torch.load(weights_only=True)`
for legacy `pytorch_model.bin` files. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jetmoe.config import JetMoeConfig

if TYPE_CHECKING:
    from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
WEIGHTS_INDEX_NAME, LEGACY_WEIGHTS_NAME = "model.safetensors.index.json", "pytorch_model.bin"


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, then rename the temporary file over `path` (same directory, so atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(
    directory: str | Path, config: JetMoeConfig, state_dict: dict[str, torch.Tensor], architecture: str
) -> None:
    """Write an HF-format directory that `transformers.AutoModel*.from_pretrained` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    meta = {**config.to_dict(), "architectures": [architecture], "dtype": str(dtype).removeprefix("torch.")}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def load_config(directory: str | Path) -> JetMoeConfig:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected an HF-format model directory)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected an HF-format model directory with config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return JetMoeConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors, a sharded safetensors index, or a legacy pytorch_model.bin."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    elif (directory / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((directory / WEIGHTS_INDEX_NAME).read_text())
        files = [directory / name for name in sorted(set(index["weight_map"].values()))]
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        files = [directory / LEGACY_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME}")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state_dict.update(load_file(path))
            else:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path}: unreadable or corrupted weights file ({err})") from None
    return state_dict


def load_checkpoint(directory: str | Path) -> tuple[JetMoeConfig, dict[str, torch.Tensor]]:
    return load_config(directory), load_state_dict(directory)


def _match_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Add or strip the `model.` prefix when a base-model checkpoint meets a task model or the reverse."""
    if expected & state_dict.keys():
        return state_dict
    stripped = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    if expected & stripped.keys():
        return stripped
    return {f"model.{k}": v for k, v in state_dict.items()}


def load_into(model: "nn.Module", state_dict: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Load weights into `model` (which may live on the meta device); mismatches raise one ValueError listing
    the missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    state_dict = _match_prefix(state_dict, set(expected))
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected if k not in state_dict and not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & state_dict.keys()
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
        if items
    ]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match {type(model).__name__}: " + "; ".join(problems))
    if tied:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
