"""Experiment configuration: omegaconf structured schemas and YAML composition.

An experiment YAML names one file per config group, then overrides only what differs::

    defaults:
      - model: small        # -> configs/model/small.yaml
      - data: stdlib        # -> configs/data/stdlib.yaml
      - optim: adamw_wsd
      - trainer: cpu
    optim:
      lr: 1.0e-3

Composition order (later wins): schema defaults < group files (in list order) < experiment body
< command-line overrides. A command-line override is either ``key.path=value`` (a dotlist entry)
or ``group=name`` (swap the file a group loads, as in Hydra: ``model=tiny``).

The ``configs/`` directory is the first ``configs/`` found walking up from the experiment file's
directory; if there is none, the repository the package was installed from (``<repo>/configs``).

Every value is merged onto the typed schema, so an unknown key or a wrongly typed value fails with
the file (or "command line") it came from; cross-field checks run once everything is merged. All
of these raise :class:`ConfigError`, a ``ValueError`` carrying a one-line message.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from jetmoe import hf_io
from jetmoe.config import PRECISIONS, JetMoeConfig, upgrade_legacy_keys
from jetmoe.data.config import DataConfig, validate_data_config
from jetmoe.data.mixture import phase_start_steps
from jetmoe.errors import ConfigError, MissingFileError, UserError, choice_problem, divisor_problem
from jetmoe.eval.config import DownstreamConfig, validate_downstream_config
from jetmoe.model.upcycle import check_upcycle_source

SCHEDULES = ("wsd", "cosine", "constant")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning 2.x's names; gpu: CUDA or MPS
ON_NONFINITE = ("stop", "skip")
CLI_SOURCE = "command line"
MISSING_VALUE = "???"  # omegaconf's marker for a required value
RUN_CONFIG = "config.yaml"  # the resolved config a run directory holds
HF_EXPORT = "hf"  # the HF-format export of a run directory


#: JetMoeConfig fields an experiment does not set: inference switches, classification heads, the HF v5 spelling
#: of rope_theta.
_NOT_EXPERIMENT_FIELDS = ("output_router_logits", "use_cache", "num_labels", "problem_type", "rope_parameters")
#: Defaults that differ from JetMoeConfig's: jetmoe.data tokenizers put <pad>, <s>, </s> at ids 0, 1, 2.
_EXPERIMENT_DEFAULTS = {"pad_token_id": 0}


def _omegaconf_type(tp: Any) -> Any:
    """omegaconf takes ``Optional[int]`` but not ``int | None``, nor ``int | list[int]`` (a single id here)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return Optional[next(a for a in args if a is not type(None))] if type(None) in args else args[0]
    return tp


def _model_config_class() -> type:
    """The ``model`` section: JetMoeConfig's fields and defaults (HF names), plus how to build the model."""
    hints = typing.get_type_hints(JetMoeConfig)
    arch = [
        (f.name, _omegaconf_type(hints[f.name]), field(default=_EXPERIMENT_DEFAULTS.get(f.name, f.default)))
        for f in dataclasses.fields(JetMoeConfig)
        if f.name not in _NOT_EXPERIMENT_FIELDS
    ]
    build = [
        ("init_from", Optional[str], field(default=None)),  # HF-format directory to fine-tune from
        ("upcycle_from", Optional[str], field(default=None)),  # dense run or HF directory to upcycle into the MoE
        ("upcycle_noise", float, field(default=0.0)),  # std of each expert copy's noise, in std(dense weight)
        ("gradient_checkpointing", bool, field(default=False)),
    ]
    cls = dataclasses.make_dataclass("ModelConfig", arch + build)
    cls.__module__ = __name__
    cls.__doc__ = """JetMoeConfig fields (HF names and defaults) plus how to build the model.

    With ``init_from`` set, the architecture fields are read from that directory's ``config.json``
    when the experiment is composed; only :data:`TRAINING_FIELDS` keep their configured values.
    """
    return cls


ModelConfig = _model_config_class()


#: ModelConfig fields that are not JetMoeConfig fields.
BUILD_FIELDS = ("init_from", "upcycle_from", "upcycle_noise", "gradient_checkpointing")
#: JetMoeConfig fields a fine-tune may change; the others are fixed by the pretrained weights.
TRAINING_FIELDS = (
    "aux_loss_coef", "router_z_loss_coef", "balancing", "bias_update_rate", "capacity_factor", "router_force_uniform",
    "attention_dropout", "kernels", "expert_impl",
)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (see :mod:`jetmoe.training.optim`)."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # WSD: share of max_steps spent in the final decay
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (wsd, cosine)
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient: stop the run, or skip that step


@dataclass
class TrainerConfig:
    """Lightning Trainer settings. Step counts are optimizer steps."""

    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2 via jetmoe.distributed)
    expert_parallel: int = 1  # fsdp: split the MoE experts by expert over groups of this many ranks (EP)
    expert_parallel_attention: bool = False  # with expert_parallel > 1: split the MoA attention experts too
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true
    max_steps: int = 1000
    val_check_interval: int = 100  # validate every N optimizer steps
    limit_val_batches: Union[int, float] = 1.0  # int: batches, float: fraction
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    compile: bool = False
    deterministic: bool = False
    retain_host_memory: bool = True  # glibc keeps freed CPU memory: no page faults re-zeroing it every step


@dataclass
class RunConfig:
    """Where a run lives and what it does besides optimizing."""

    name: str = "default"
    output_dir: str = "runs"  # relative to the working directory
    seed: int = 1337
    sample_prompt: str = "def "
    sample_tokens: int = 200
    expert_metrics: bool = True  # routing statistics (ExpertUtilizationCallback); false turns them off
    expert_log_every_n_steps: int = 50  # a multiple of trainer.log_every_n_steps
    heatmap_every_n_steps: int = 200  # TensorBoard expert-load images, at the expert log steps; 0 disables


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


GROUPS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
_GROUP_SCHEMAS = typing.get_type_hints(ExperimentConfig)  # group name -> its dataclass


# ----------------------------------------------------------------------------- composition


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Compose an experiment YAML with its group defaults and ``key=value`` overrides."""
    path = Path(path)
    body = read_yaml(path)
    source = display_path(path)
    defaults = {group: (name, source) for group, name in _parse_defaults(body.pop("defaults", []), source).items()}
    dotlist = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{CLI_SOURCE}: override {item!r} is not key=value")
        if key in GROUPS:  # group=name swaps a defaults entry
            defaults[key] = (item[len(key) + 1 :], CLI_SOURCE)
        else:
            dotlist.append(item)

    configs_dir = find_configs_dir(path)
    merged = OmegaConf.structured(ExperimentConfig)
    for group, (name, named_in) in defaults.items():
        group_file = configs_dir / group / f"{name}.yaml"
        if not group_file.is_file():
            raise ConfigError(f"{named_in}: no config '{group}: {name}' ({display_path(group_file)} not found)")
        merged = _merge(merged, {group: read_yaml(group_file)}, display_path(group_file))
    merged = _merge(merged, body, source)
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{CLI_SOURCE}: cannot parse overrides {' '.join(dotlist)!r}: {_first_line(err)}") from None
    merged = _merge(merged, cli, CLI_SOURCE)
    if not OmegaConf.is_missing(merged.model, "init_from") and merged.model.init_from is not None:
        _adopt_pretrained_architecture(merged.model)
    dense = _read_upcycle_source(merged.model)
    cfg = _finalize(merged)
    if dense is not None:
        try:
            check_upcycle_source(dense, build_model_config(cfg.model), source=cfg.model.upcycle_from)
        except ConfigError as err:
            raise ConfigError(f"model.upcycle_from: {err}") from None
    return cfg


def from_dict(raw: dict[str, Any], source: str = "checkpoint") -> ExperimentConfig:
    """Rebuild a validated config from :func:`to_dict` output (e.g. a checkpoint's hyperparameters)."""
    return _finalize(_merge(OmegaConf.structured(ExperimentConfig), raw, source))


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config of a run directory written by ``jetmoe train`` (its ``config.yaml``)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (expected a run directory written by jetmoe train)")
    return from_dict(read_yaml(path), source=display_path(path))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain Python containers (for ``save_hyperparameters`` and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def find_configs_dir(experiment: str | Path) -> Path:
    """The ``configs/`` directory for an experiment file (see module docstring)."""
    for parent in Path(experiment).resolve().parents:
        if (parent / "configs").is_dir():
            return parent / "configs"
    return Path(__file__).resolve().parents[3] / "configs"


def _adopt_pretrained_architecture(model: DictConfig) -> None:
    """Set the architecture fields of ``model`` from ``init_from`` (a directory or a hub repository, resolved once
    to its local directory)."""
    try:
        directory = hf_io.resolve_model_dir(model.init_from)
        pretrained = hf_io.load_config(directory)
    except UserError as err:
        raise type(err)(f"model.init_from: {err}") from None
    model.init_from = str(directory)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in BUILD_FIELDS + TRAINING_FIELDS:
            model[f.name] = getattr(pretrained, f.name)


def _read_upcycle_source(model: DictConfig) -> Optional[JetMoeConfig]:
    """The config of the dense model ``upcycle_from`` names (a run directory or an HF directory), None without one.
    ``upcycle_from`` becomes that HF directory, as ``init_from`` does, before interpolations are resolved (so that
    ``${model.upcycle_from}/tokenizer.json`` is the dense model's tokenizer)."""
    if OmegaConf.is_missing(model, "upcycle_from") or model.upcycle_from is None:
        return None
    try:
        directory = model_dir_of(model.upcycle_from)
        dense = hf_io.load_config(directory)
    except UserError as err:
        raise type(err)(f"model.upcycle_from: {err}") from None
    model.upcycle_from = str(directory)
    return dense


def model_dir_of(path: str | Path) -> Path:
    """The HF model directory of a run directory (its ``hf/``), or ``path`` itself when it is one."""
    path = Path(path)
    hf_dir = path / HF_EXPORT if (path / HF_EXPORT / "config.json").is_file() else path
    if not (hf_dir / "config.json").is_file():
        raise MissingFileError(
            f"{path} is neither a run directory (with {HF_EXPORT}/) nor a model directory (with config.json)"
        )
    return hf_dir


def display_path(path: Path) -> str:
    """A path as short as possible: relative to the working directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``), with omegaconf's scalar rules; ConfigError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{display_path(path)}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{display_path(path)}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{display_path(path)}: expected a mapping of config keys, got a {type(data).__name__}")
    # Parse again with omegaconf's YAML rules (e.g. 1e-3 is a float there, a string for PyYAML).
    return OmegaConf.to_container(OmegaConf.create(text))


def _parse_defaults(entries: Any, source: str) -> dict[str, str]:
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'defaults' must be a list like [{{model: small}}, {{optim: adamw_wsd}}]")
    defaults: dict[str, str] = {}
    for entry in entries:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise ConfigError(f"{source}: defaults entry {entry!r} must be a single 'group: name' pair")
        ((group, name),) = entry.items()
        if group not in GROUPS:
            raise ConfigError(f"{source}: defaults: unknown group {group!r} (choose from {', '.join(GROUPS)})")
        defaults[group] = str(name)
    return defaults


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    """Merge ``update`` onto ``base``, turning omegaconf errors into one-line ConfigErrors."""
    update = _upgrade_legacy_keys(update)
    for group, value in update.items() if isinstance(update, dict) else ():
        if group in GROUPS and not isinstance(value, (dict, type(None))):
            raise ConfigError(f"{source}: '{group}' must be a mapping of {group} settings, got {value!r}")
    for key, value in _leaves(update):  # omegaconf would turn 2 into True for a bool field
        group, _, name = key.partition(".")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and group in _GROUP_SCHEMAS:
            if _field_type(_GROUP_SCHEMAS[group], name) == "bool":
                raise ConfigError(f"{source}: '{key}' expects bool, got {value!r}")
    try:
        merged = OmegaConf.merge(base, update)
        for key in _required_keys(update):  # merging "???" keeps the old value: mark it missing again
            OmegaConf.update(merged, key, MISSING_VALUE, merge=False)
        return merged
    except ConfigKeyError as err:
        hint = re.search(r"Did you mean: '(\w+)'", err.msg or "")
        parent = err.full_key.rpartition(".")[0] if err.full_key else ""
        suggestion = f" (did you mean '{parent + '.' if parent else ''}{hint.group(1)}'?)" if hint else ""
        raise ConfigError(f"{source}: unknown key '{err.full_key}'{suggestion}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe_validation(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_first_line(err)}") from None


def _upgrade_legacy_keys(update: Any) -> Any:
    """``update`` with the model keys of earlier versions renamed (:func:`jetmoe.config.upgrade_legacy_keys`), so
    that older experiment files and run directories keep working."""
    if isinstance(update, DictConfig):
        update = OmegaConf.to_container(update)
    if isinstance(update, dict) and isinstance(update.get("model"), dict):
        return {**update, "model": upgrade_legacy_keys(update["model"])}
    return update


def _leaves(update: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value in ``update`` that is not a mapping."""
    items = update.items() if isinstance(update, dict) else OmegaConf.to_container(update).items()
    for key, value in items:
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _required_keys(update: Any) -> Iterator[str]:
    """Dotted keys that ``update`` sets to ``???`` (a value the command line must provide)."""
    return (key for key, value in _leaves(update) if value == MISSING_VALUE)


def _describe_validation(err: ValidationError) -> str:
    expected = _field_type(err.object_type, err.key)
    if err.full_key and expected:
        return f"'{err.full_key}' expects {expected}, got {err.value!r}"
    if err.full_key:
        return f"'{err.full_key}': {_first_line(err)}"
    return _first_line(err)


def _field_type(cls: Any, key: Any) -> Optional[str]:
    if not dataclasses.is_dataclass(cls):
        return None
    hints = typing.get_type_hints(cls)
    return _type_name(hints[key]) if key in hints else None


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _first_line(err: Exception) -> str:
    msg = getattr(err, "msg", None) or str(err)
    return msg.strip().splitlines()[0]


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.is_interpolation(OmegaConf.select(cfg, parent) if parent else cfg, leaf)


def _finalize(merged: DictConfig) -> ExperimentConfig:
    missing = sorted(key for key in OmegaConf.missing_keys(merged) if not _is_interpolation(merged, key))
    if missing:
        raise ConfigError(f"missing required value '{missing[0]}' (set it on the command line: {missing[0]}=...)")
    try:
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = f"'{err.full_key}': " if err.full_key else ""
        raise ConfigError(f"{key}{_first_line(err)}") from None
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- cross-field checks


def validate(cfg: ExperimentConfig) -> None:
    """Value and cross-field checks; raises ConfigError with one line naming the keys."""
    problem = next(_problems(cfg), None)
    if problem:
        raise ConfigError(problem)


def _problems(cfg: ExperimentConfig) -> Iterator[str]:
    m, o, t, r = cfg.model, cfg.optim, cfg.trainer, cfg.run
    try:
        build_model_config(m)
    except ValueError as err:
        yield f"model.{err}"
    if m.upcycle_noise < 0:
        yield f"model.upcycle_noise must be >= 0 (0: exact copies), got {m.upcycle_noise}"
    if m.upcycle_from is not None and m.init_from is not None:
        yield "model.upcycle_from and model.init_from exclude each other: upcycle a dense model, or fine-tune a model"
    if m.upcycle_from is not None and t.strategy == "fsdp":
        yield "model.upcycle_from is not supported with trainer.strategy=fsdp yet"
    try:
        validate_data_config(cfg.data)
    except ValueError as err:
        yield str(err)
    if cfg.data.seq_len > m.max_position_embeddings:
        yield (f"data.seq_len ({cfg.data.seq_len}) must be <= "
               f"model.max_position_embeddings ({m.max_position_embeddings})")
    for key, value, choices in (("optim.on_nonfinite", o.on_nonfinite, ON_NONFINITE),
                                ("optim.schedule", o.schedule, SCHEDULES),
                                ("trainer.accelerator", t.accelerator, ACCELERATORS),
                                ("trainer.strategy", t.strategy, STRATEGIES),
                                ("trainer.precision", t.precision, PRECISIONS)):
        problem = choice_problem(key, value, choices)
        if problem:
            yield problem
    if not _valid_devices(t.devices):  # else Lightning's "`Trainer(devices=0)` value is not a valid input"
        yield ("trainer.devices must be a number of devices > 0, -1 (all), auto, or comma-separated device indices "
               f"such as '0,1', got {t.devices!r}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        yield f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}"
    for key in ("lr", "eps"):
        if getattr(o, key) <= 0:
            yield f"optim.{key} must be > 0, got {getattr(o, key)}"
    for key in ("weight_decay", "grad_clip"):
        if getattr(o, key) < 0:
            yield f"optim.{key} must be >= 0 (0 disables), got {getattr(o, key)}"
    for key in ("decay_fraction", "min_lr_ratio"):
        if not 0 <= getattr(o, key) <= 1:
            yield f"optim.{key} must be in [0, 1], got {getattr(o, key)}"
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "accumulate_grad_batches", "num_nodes",
                "expert_parallel"):
        if getattr(t, key) <= 0:
            yield f"trainer.{key} must be > 0, got {getattr(t, key)}"
            return  # the checks below divide by these
    if t.expert_parallel > 1 and t.strategy != "fsdp":
        yield f"trainer.expert_parallel ({t.expert_parallel}) needs trainer.strategy=fsdp, got {t.strategy!r}"
    if t.expert_parallel_attention and t.expert_parallel == 1:  # else silently a no-op
        yield "trainer.expert_parallel_attention needs trainer.expert_parallel > 1, got 1"
    problem = divisor_problem("trainer.expert_parallel", t.expert_parallel, "model.num_local_experts",
                              m.num_local_experts)
    if problem:
        yield problem
    if not 0 <= o.warmup_steps <= t.max_steps:
        yield f"optim.warmup_steps ({o.warmup_steps}) must be in [0, trainer.max_steps ({t.max_steps})]"
    stable_end = int(t.max_steps * (1 - o.decay_fraction))
    if o.schedule == "wsd" and o.warmup_steps > stable_end:
        yield (f"optim.warmup_steps ({o.warmup_steps}) runs into the WSD decay: it must be <= "
               f"trainer.max_steps * (1 - optim.decay_fraction) ({stable_end})")
    try:
        data_phase_steps(cfg)
    except ValueError as err:
        yield str(err)
    if r.expert_log_every_n_steps <= 0 or r.expert_log_every_n_steps % t.log_every_n_steps:
        yield (f"run.expert_log_every_n_steps ({r.expert_log_every_n_steps}) must be a positive multiple of "
               f"trainer.log_every_n_steps ({t.log_every_n_steps})")
    if r.heatmap_every_n_steps < 0:
        yield f"run.heatmap_every_n_steps must be >= 0 (0 disables), got {r.heatmap_every_n_steps}"
    if r.sample_tokens < 0:
        yield f"run.sample_tokens must be >= 0, got {r.sample_tokens}"
    if not r.name or "/" in r.name or r.name in (".", ".."):
        yield f"run.name must be a plain directory name, got {r.name!r}"
    try:
        validate_downstream_config(cfg.downstream)
    except ValueError as err:
        yield str(err)


def _valid_devices(devices: int | str) -> bool:
    """Lightning's forms of ``devices`` that the schema (int or str) can hold: a count > 0, -1 (all), "auto", or
    distinct comma-separated device indices ("0,1", "1,"). Checked here, as Lightning's own error names no key."""
    text = str(devices).strip()
    if text in ("auto", "-1") or (text.isdigit() and int(text) > 0):
        return True
    indices = [index.strip() for index in text.split(",") if index.strip()]
    return "," in text and bool(indices) and all(index.isdigit() for index in indices) and (
        len(set(map(int, indices))) == len(indices))


def wsd_decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first optimizer step of the WSD decay (where JetMoE's phase-2 data mixture starts)."""
    return max_steps - round(decay_fraction * max_steps)


def data_phase_steps(cfg: ExperimentConfig) -> list[int]:
    """The optimizer step at which each of ``data.phases`` starts ("decay": the WSD decay's first step)."""
    o, t = cfg.optim, cfg.trainer
    decay_start = wsd_decay_start(t.max_steps, o.decay_fraction) if o.schedule == "wsd" and o.decay_fraction else None
    return phase_start_steps(cfg.data, max_steps=t.max_steps, decay_start=decay_start)


def build_model_config(m: ModelConfig) -> JetMoeConfig:
    """The :class:`jetmoe.JetMoeConfig` described by the ``model`` section."""
    fields = {k: v for k, v in dataclasses.asdict(m).items() if k not in BUILD_FIELDS}
    return JetMoeConfig(**fields)
