"""Checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` with transformers' JetMoe key names,
read by `transformers.AutoModelForCausalLM.from_pretrained` and written by its `save_pretrained`.

Module names in `jetmoe.model` are those of transformers, so the key adapter is the identity apart from the tied LM
head (not stored, as transformers does) and the `model.` prefix between base and task models. Nothing here
unpickles arbitrary objects: weights come from safetensors, or `torch.load(weights_only=True)` for legacy
`pytorch_model.bin` files. Files are written to a temporary name and renamed into place (`jetmoe.files`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from jetmoe.config import JetMoeConfig
from jetmoe.errors import ConfigError, InputFileError, MissingFileError
from jetmoe.files import atomic_write, atomic_write_json
from jetmoe.hf_export import ModelCard, complete_hf_dir, write_generation_config
from jetmoe.model import JetMoeForCausalLM, JetMoePreTrainedModel

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
WEIGHTS_INDEX_NAME, LEGACY_WEIGHTS_NAME = "model.safetensors.index.json", "pytorch_model.bin"
HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; anything else is a local path
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]  # safetensors only: nothing to unpickle
SELECTION_BIAS_KEY = ".router.expert_bias"  # balancing="bias": a router buffer transformers does not know

log = logging.getLogger("jetmoe")


# ----------------------------------------------------------------------------- writing


def save_pretrained(
    model: JetMoePreTrainedModel, directory: str | Path, tokenizer: str | Path | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Write `model` as an HF-format directory (`config.json`, `model.safetensors`, `generation_config.json`, which
    needs only the config); with a `tokenizer.json`, a complete one that every Hugging Face tool accepts (tokenizer
    files with the special tokens, a model card: `hf_export.complete_hf_dir`). Returns the directory."""
    write_checkpoint(directory, model.config, model.state_dict(), type(model).__name__)
    if tokenizer is not None:
        complete_hf_dir(directory, model.config, tokenizer, card)
    else:
        write_generation_config(directory, model.config)
    return Path(directory)


def write_checkpoint(
    directory: str | Path, config: JetMoeConfig, state_dict: dict[str, torch.Tensor], architecture: str
) -> Path:
    """`save_pretrained` from a state dict (e.g. one gathered from shards) instead of a model."""
    directory = Path(directory)
    if not config.transformers_routes_alike:
        log.warning("%s: transformers' JetMoe routes this model without its %s; jetmoe.load_pretrained reproduces it",
                    directory, "forced uniform assignment" if config.router_force_uniform else "selection biases")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    meta = {**config.to_dict(), "architectures": [architecture], "dtype": str(dtype).removeprefix("torch.")}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, meta, indent=2)
    return directory


# ----------------------------------------------------------------------------- reading


def load_pretrained(
    name_or_path: str | Path, model_class: type[JetMoePreTrainedModel] = JetMoeForCausalLM, **config_overrides: Any
) -> JetMoePreTrainedModel:
    """A model (default `JetMoeForCausalLM`) from an HF-format directory written here or by transformers, or from a
    hub repository such as `jetmoe/jetmoe-8b` (`resolve_model_dir`); `config_overrides` replace config fields
    (e.g. `kernels="reference"`)."""
    directory = resolve_model_dir(name_or_path)
    config = load_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    state_dict = load_state_dict(directory)
    with torch.device("meta"):
        model = model_class(config)
    load_into(model, state_dict, source=directory)
    return model


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as it is; otherwise a hub repository id, whose config, weights and tokenizer files are
    downloaded once into the Hugging Face cache (`huggingface_hub.snapshot_download`: `HF_HOME`, `HF_HUB_OFFLINE`
    and tokens apply as in `transformers`; offline, the cached snapshot is used)."""
    path = Path(name_or_path)
    if path.exists() or not HUB_REPO_ID.fullmatch(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MissingFileError(
            f"{name_or_path}: not a local directory, and the hub repository could not be read ({reason})"
        ) from None


def load_config(directory: str | Path) -> JetMoeConfig:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise MissingFileError(f"{directory}: not a directory (expected an HF-format model directory)")
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (expected an HF-format model directory with config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputFileError(f"{path}: expected a JSON object")
    try:
        return JetMoeConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


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
        raise MissingFileError(f"{directory}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME}")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state_dict.update(load_file(path))
            else:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise InputFileError(f"{path}: unreadable or corrupted weights file ({err})") from None
    return state_dict


def _match_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Add or strip the `model.` prefix when a base-model checkpoint meets a task model or the reverse."""
    if expected & state_dict.keys():
        return state_dict
    stripped = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    if expected & stripped.keys():
        return stripped
    return {f"model.{k}": v for k, v in state_dict.items()}


def with_selection_biases(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The routers' selection biases are optional in a checkpoint: a model that keeps none drops them (e.g. a
    fine-tune with another `balancing`), one that keeps them starts the missing ones at 0 (a checkpoint written
    by transformers, or trained with another method)."""
    out = {k: v for k, v in state_dict.items() if k in expected or not k.endswith(SELECTION_BIAS_KEY)}
    for key, tensor in expected.items():
        if key.endswith(SELECTION_BIAS_KEY) and key not in out:
            out[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    return out


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Load weights into `model` (which may live on the meta device); mismatches raise one InputFileError listing the
    missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    state_dict = with_selection_biases(_match_prefix(state_dict, set(expected)), expected)
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
        raise InputFileError(f"{source}: checkpoint does not match {type(model).__name__}: " + "; ".join(problems))
    if tied:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
