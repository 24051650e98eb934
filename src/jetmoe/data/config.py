"""DataConfig: where the text comes from, how it is tokenized and packed (an omegaconf structured config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

SOURCES = ("stdlib", "files", "hub", "disk")
TEXT_SPLITS = ("file", "line", "paragraph")


@dataclass
class DataConfig:
    """The `data:` config group. Only omegaconf-supported field types."""

    source: str = "stdlib"  # stdlib | files | hub | disk
    # files: paths or globs. json/jsonl/parquet give one document per row (`text_field`);
    # any other file is UTF-8 text cut into documents by `text_split`.
    data_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    text_split: str = "file"  # file | line | paragraph (text files only)
    stdlib_include_tests: bool = False  # stdlib: also read test/, tests/, idlelib/idle_test
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"  # split read from the hub, or from a DatasetDict saved to disk
    disk_path: Optional[str] = None  # a `datasets.save_to_disk` directory
    max_chars: Optional[int] = None  # keep the first max_chars characters of the corpus (in source order)
    val_fraction: float = 0.05  # fraction of documents held out (at least one)
    seq_len: int = 256
    batch_size: int = 16  # per device
    tokenizer_path: Optional[str] = None  # load this tokenizer.json instead of training a BPE
    tokenizer_train_chars: Optional[int] = None  # cap on the training text used to fit the BPE
    intra_doc_mask: bool = False  # carried for the training module: mask attention across documents
    num_workers: int = 0
    cache_dir: str = ".cache/jetmoe"


def validate_data_config(cfg: DataConfig) -> None:
    """Raises ValueError with one line naming the first invalid field and what it expects."""
    _one_of("source", cfg.source, SOURCES)
    _one_of("text_split", cfg.text_split, TEXT_SPLITS)
    if cfg.source == "files" and not cfg.data_files:
        raise ValueError("data.data_files must list at least one path or glob when data.source is 'files'")
    if cfg.source == "hub" and not cfg.hub_name:
        raise ValueError("data.hub_name must be set when data.source is 'hub'")
    if cfg.source == "disk" and not cfg.disk_path:
        raise ValueError("data.disk_path must be set when data.source is 'disk'")
    if not cfg.text_field:
        raise ValueError("data.text_field must be a non-empty column name")
    for name in ("seq_len", "batch_size"):
        _positive_int(name, getattr(cfg, name))
    for name in ("max_chars", "tokenizer_train_chars"):
        if getattr(cfg, name) is not None:
            _positive_int(name, getattr(cfg, name))
    if not isinstance(cfg.num_workers, int) or isinstance(cfg.num_workers, bool) or cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be an integer >= 0, got {cfg.num_workers!r}")
    if isinstance(cfg.val_fraction, bool) or not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction must be a number in (0, 1), got {cfg.val_fraction!r}")
    if not cfg.cache_dir:
        raise ValueError("data.cache_dir must be a non-empty path")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"data.{name} must be one of {', '.join(choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
