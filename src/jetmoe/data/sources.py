"""Corpus sources -> documents (plain strings), and the deterministic train/val split.

Sources (``DataConfig.source``):
  stdlib  the running interpreter's standard library ``.py`` files, one document per file
  files   local files through ``datasets``: json/jsonl/parquet rows (``text_field``), any other file UTF-8 text
  hub     ``datasets.load_dataset(hub_name, hub_config, split=hub_split)``
  disk    ``datasets.load_from_disk(disk_path)``
"""

from __future__ import annotations

import glob
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

import datasets
import numpy as np

from jetmoe.data.config import DataConfig

MIN_DOCUMENTS = 20  # a corpus with fewer documents is cut into blocks of lines, so a val split exists
SMALL_CORPUS_BLOCKS = 100  # about how many blocks such a corpus is cut into
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
ROW_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # any other suffix: "text"
SAMPLE_BY = {"file": "document", "line": "line", "paragraph": "paragraph"}  # text_split -> datasets' sample_by


def load_documents(cfg: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs) of the configured corpus, split by a permutation seeded with `seed`."""
    return split_documents(read_corpus(cfg), cfg.val_fraction, seed)


def read_corpus(cfg: DataConfig) -> list[str]:
    """The non-empty documents of the source in source order, capped at `max_chars`, small corpora cut into blocks."""
    if cfg.source == "stdlib":
        docs: Iterable[str] = (_read_lenient(p) for p in stdlib_files(cfg.stdlib_include_tests))
    elif cfg.source == "files":
        docs = read_files(resolve_files(cfg.data_files), cfg.text_field, cfg.text_split, cfg.cache_dir)
    elif cfg.source == "hub":
        cache = _datasets_cache(cfg.cache_dir)
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split, cache_dir=cache)
        docs = text_column(ds, cfg.text_field, where=f"hub dataset {cfg.hub_name}")
    else:
        docs = text_column(_load_disk(cfg.disk_path, cfg.hub_split), cfg.text_field, where=str(cfg.disk_path))
    return cut_small_corpus(take_chars(docs, cfg.max_chars))


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out round(n * val_fraction) documents (at least 1, at most n - 1); both lists in permuted order."""
    n = len(docs)
    if n < 2:
        raise ValueError(f"the corpus has {n} document(s) with text; at least 2 are needed for a validation split")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def take_chars(docs: Iterable[str], max_chars: Optional[int]) -> list[str]:
    """Non-blank documents in order until `max_chars` characters (the last one truncated); all when None."""
    kept: list[str] = []
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            break
        if not is_blank(doc):
            kept.append(doc if max_chars is None else doc[: max_chars - total])
            total += len(kept[-1])
    return kept


def is_blank(text: Optional[str]) -> bool:
    return not text or text.isspace()


def cut_small_corpus(docs: list[str]) -> list[str]:
    """Fewer than MIN_DOCUMENTS documents (e.g. one big .txt): cut them into ~SMALL_CORPUS_BLOCKS blocks of lines."""
    if len(docs) >= MIN_DOCUMENTS:
        return docs
    size = max(1, sum(map(len, docs)) // SMALL_CORPUS_BLOCKS)
    return [block for doc in docs for block in _blocks_of_lines(doc, size) if not is_blank(block)]


def _blocks_of_lines(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each ending at the first newline at or after `size` characters."""
    start = 0
    while start < len(text):
        newline = text.find("\n", start + size - 1)
        end = len(text) if newline < 0 else newline + 1
        yield text[start:end]
        start = end


# ----------------------------------------------------------------------------- stdlib


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """Sorted `.py` files of the interpreter's standard library, without site-packages (and test suites)."""
    skip = {"site-packages", "__pycache__"} | (set() if include_tests else STDLIB_TEST_DIRS)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib_root()):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune the walk in place
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_lenient(path: Path) -> str:
    """UTF-8 with undecodable bytes dropped (a few stdlib files are latin-1)."""
    return path.read_bytes().decode("utf-8", errors="ignore")


# ----------------------------------------------------------------------------- local files


def resolve_files(patterns: Iterable[str]) -> list[Path]:
    """Absolute paths of the files that `patterns` (paths or globs, `**` allowed) name, in order, without repeats."""
    paths: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [m for m in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"data.data_files: pattern {pattern!r} matches no files")
            paths += matches
        elif os.path.isdir(expanded):
            raise ValueError(f"data.data_files: {pattern} is a directory; use a glob such as {pattern}/**/*.txt")
        elif not os.path.isfile(expanded):
            raise ValueError(f"data.data_files: file not found: {pattern}")
        else:
            paths.append(expanded)
    return list(dict.fromkeys(Path(p).resolve() for p in paths))


def read_files(paths: Iterable[Path], text_field: str, text_split: str, cache_dir: str) -> list[str]:
    """Documents of every file, in order (see `read_file`)."""
    return [doc for path in paths for doc in read_file(path, text_field, text_split, cache_dir)]


def read_file(path: Path, text_field: str, text_split: str, cache_dir: str) -> list[str]:
    """One file's non-blank documents through `datasets`; raises ValueError naming the file when it has no text."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    builder = ROW_BUILDERS.get(path.suffix.lower())
    if builder is None:
        check_utf8_text(path)
        ds = _load_file("text", path, cache_dir, sample_by=SAMPLE_BY[text_split])
        docs = text_column(ds, "text", where=str(path))
    else:
        docs = text_column(_load_file(builder, path, cache_dir), text_field, where=str(path))
    if not docs:
        raise ValueError(f"{path}: contains no text")
    return docs


def check_utf8_text(path: Path) -> None:
    """Raises ValueError naming `path` unless it is UTF-8 text (decodes, no NUL bytes)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (bad byte at offset {err.start}); text files must be UTF-8 text") from None
    if b"\x00" in data:
        raise ValueError(f"{path}: looks binary (contains NUL bytes); text files must be UTF-8 text")


def _load_file(builder: str, path: Path, cache_dir: str, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", keep_in_memory=True, cache_dir=_datasets_cache(cache_dir),
            **kwargs,
        )
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise ValueError(f"{path}: could not be read as {builder}: {str(cause).splitlines()[0]}") from err


# ----------------------------------------------------------------------------- datasets helpers


def text_column(ds: datasets.Dataset, field: str, *, where: str) -> list[str]:
    """The non-blank strings of column `field`; ValueError naming the field, `where` and the columns."""
    if field not in ds.column_names:
        raise ValueError(
            f"data.text_field {field!r} is not a column of {where}; available columns: {', '.join(ds.column_names)}"
        )
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.text_field {field!r} of {where} must be a string column, got {feature}")
    return [text for text in ds.with_format("arrow")[field].to_pylist() if not is_blank(text)]


def _load_disk(disk_path: str, split: str) -> datasets.Dataset:
    if not Path(disk_path).is_dir():
        raise ValueError(f"data.disk_path: directory not found: {disk_path}")
    ds = datasets.load_from_disk(disk_path, keep_in_memory=True)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.hub_split {split!r} is not a split of {disk_path}; available: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _datasets_cache(cache_dir: str) -> str:
    return str(Path(cache_dir) / "datasets")


# ----------------------------------------------------------------------------- cache fingerprint


def source_fingerprint(cfg: DataConfig) -> list:
    """What identifies the source's current content beyond the config: files' paths, sizes and mtimes."""
    if cfg.source == "stdlib":
        return [str(stdlib_root()), platform.python_version()]
    if cfg.source == "files":
        return [file_fingerprint(p) for p in resolve_files(cfg.data_files)]
    if cfg.source == "disk" and Path(cfg.disk_path).is_dir():
        return [file_fingerprint(p) for p in sorted(Path(cfg.disk_path).rglob("*")) if p.is_file()]
    return []  # hub: identified by name, config and split alone


def file_fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
