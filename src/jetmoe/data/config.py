"""DataConfig: the named sources of a run, their mixture weights and phases, tokenizer and packing (omegaconf).

A run reads one or more named sources (``data.sources``: a mapping, so ``data.sources.web.weight=0.5`` overrides one
of them). Windows are drawn from the sources by weight; ``data.phases`` change the weights at given steps, e.g. at
the start of the WSD decay as in JetMoE's phase 2 (see `jetmoe.data.mixture`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from jetmoe.errors import ConfigError, choice_problem

KINDS = ("stdlib", "files", "hub", "disk")
TEXT_SPLITS = ("file", "line", "paragraph")
DECAY = "decay"  # a phase start: the step where the WSD schedule starts its decay
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a directory name and a TensorBoard tag
MAX_VAL_FRACTION = 0.5


@dataclass
class SourceConfig:
    """One named source: where its documents come from and its weight in the mixture before any phase."""

    kind: str = "stdlib"  # stdlib | files | hub | disk
    weight: float = 1.0  # share of windows until the first phase (normalized over the sources); 0: phases only
    # files: paths or globs. json/jsonl/parquet give one document per row (`text_field`);
    # any other file is UTF-8 text cut into documents by `text_split`.
    data_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    text_split: str = "file"  # file | line | paragraph (text files only)
    stdlib_include_tests: bool = False  # stdlib: also read test/, tests/, idlelib/idle_test
    hub_name: Optional[str] = None  # a hub dataset name or a local directory of data files (streamed)
    hub_config: Optional[str] = None
    hub_split: str = "train"  # split read from the hub, or from a DatasetDict saved to disk
    disk_path: Optional[str] = None  # a `datasets.save_to_disk` directory


@dataclass
class PhaseConfig:
    """From step `start` on, windows are drawn with `weights` (sources left out get none)."""

    start: Union[int, float, str] = 0  # an optimizer step, a fraction of trainer.max_steps, or "decay"
    weights: dict[str, float] = field(default_factory=dict)
    name: Optional[str] = None  # for logs; default "phase<i>"


@dataclass
class DataConfig:
    """The `data:` config group. Only omegaconf-supported field types."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)  # name -> source; none named: stdlib
    phases: list[PhaseConfig] = field(default_factory=list)  # later mixtures, in step order
    max_chars: Optional[int] = None  # read only the first max_chars characters of each source (smoke runs)
    val_fraction: float = 0.05  # share of each source's documents held out, spread evenly through it
    seq_len: int = 256
    batch_size: int = 16  # per device
    tokenizer_path: Optional[str] = None  # load this tokenizer.json instead of training a BPE
    tokenizer_train_chars: Optional[int] = 16_000_000  # the BPE trains on this many characters of the sources
    intra_doc_mask: bool = False  # carried for the training module: mask attention across documents
    num_workers: int = 0  # DataLoader worker processes (reading windows from the memory-mapped store is cheap)
    skip_batches: int = 0  # start this far into the data order: continue another run's stream (e.g. its upcycling)
    prepare_workers: int = 2  # chunks tokenized at once by `jetmoe prepare` (threads; tokenizers adds its own)
    shard_tokens: int = 1 << 28  # training tokens per shard file (about; a shard ends at a chunk boundary)
    store_dir: Optional[str] = None  # the prepared token store; default <cache_dir>/store-<tokenizer hash>
    cache_dir: str = ".cache/jetmoe"

    def __post_init__(self) -> None:
        if not self.sources:  # no source named anywhere: the built-in corpus (a schema default would be merged
            self.sources = {"stdlib": SourceConfig()}  # with every named source instead of replaced by them)


def phase_name(index: int, phase: PhaseConfig) -> str:
    return phase.name or f"phase{index + 1}"


def validate_data_config(cfg: DataConfig) -> None:
    """Raises ConfigError with one line naming the first invalid field and what it expects."""
    problem = next(_problems(cfg), None)
    if problem:
        raise ConfigError(problem)


def _problems(cfg: DataConfig) -> Iterator[str]:
    for name, src in cfg.sources.items():
        yield from _source_problems(name, src)
    for name in ("seq_len", "batch_size", "prepare_workers", "shard_tokens"):
        yield from _positive_int(f"data.{name}", getattr(cfg, name))
    for name in ("max_chars", "tokenizer_train_chars"):
        if getattr(cfg, name) is not None:
            yield from _positive_int(f"data.{name}", getattr(cfg, name))
    for name in ("num_workers", "skip_batches"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            yield f"data.{name} must be an integer >= 0, got {value!r}"
    if isinstance(cfg.val_fraction, bool) or not 0 < cfg.val_fraction <= MAX_VAL_FRACTION:
        yield f"data.val_fraction must be a number in (0, {MAX_VAL_FRACTION}], got {cfg.val_fraction!r}"
    if not cfg.cache_dir:
        yield "data.cache_dir must be a non-empty path"
    if cfg.store_dir == "":
        yield "data.store_dir must be a path or null"
    yield from _mixture_problems(cfg)


def _source_problems(name: str, src: SourceConfig) -> Iterator[str]:
    key = f"data.sources.{name}"
    if not SOURCE_NAME.fullmatch(name):
        yield f"{key}: a source name must be letters, digits, '_', '-' or '.' (it names a directory)"
    for field_name, choices in (("kind", KINDS), ("text_split", TEXT_SPLITS)):
        problem = choice_problem(f"{key}.{field_name}", getattr(src, field_name), choices)
        if problem:
            yield problem
    if src.kind == "files" and not src.data_files:
        yield f"{key}.data_files must list at least one path or glob when its kind is 'files'"
    if src.kind == "hub" and not src.hub_name:
        yield f"{key}.hub_name must be set when its kind is 'hub'"
    if src.kind == "disk" and not src.disk_path:
        yield f"{key}.disk_path must be set when its kind is 'disk'"
    if not src.text_field:
        yield f"{key}.text_field must be a non-empty column name"
    yield from _weight(f"{key}.weight", src.weight)


def _mixture_problems(cfg: DataConfig) -> Iterator[str]:
    """Weights: numbers >= 0, each mixture summing to a positive number, every source sampled somewhere."""
    base = {name: src.weight for name, src in cfg.sources.items()}
    if sum(base.values()) <= 0:
        yield (f"data.sources: the weights ({', '.join(f'{n}={w}' for n, w in base.items())}) must sum to a "
               "positive number")
    used = {name for name, w in base.items() if w > 0}
    for i, phase in enumerate(cfg.phases):
        key = f"data.phases[{i}]"
        start = phase.start
        if isinstance(start, str) and start != DECAY:
            yield f"{key}.start must be a step (int), a fraction of trainer.max_steps in (0, 1) or '{DECAY}', got {start!r}"
        elif isinstance(start, float) and not 0 < start < 1:
            yield f"{key}.start: a fraction of trainer.max_steps must be in (0, 1), got {start}"
        elif isinstance(start, int) and not isinstance(start, bool) and start <= 0:
            yield f"{key}.start must be after step 0 (the sources' weights are the mixture at step 0), got {start}"
        if not phase.weights:
            yield f"{key}.weights must give at least one source a weight"
        for name, weight in phase.weights.items():
            if name not in cfg.sources:
                yield f"{key}.weights: unknown source {name!r} (sources: {', '.join(cfg.sources)})"
            yield from _weight(f"{key}.weights.{name}", weight)
        if phase.weights and sum(phase.weights.values()) <= 0:
            yield f"{key}.weights must sum to a positive number, got {dict(phase.weights)}"
        used |= {name for name, w in phase.weights.items() if w > 0}
    for name in cfg.sources:
        if name not in used:
            yield (f"data.sources.{name}.weight is 0 and no data.phases entry gives it a weight: every source "
                   "must be drawn from (give it a positive weight or remove it)")


def _weight(key: str, value: Any) -> Iterator[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        yield f"{key} must be a number >= 0, got {value!r}"


def _positive_int(key: str, value: Any) -> Iterator[str]:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        yield f"{key} must be a positive integer, got {value!r}"
