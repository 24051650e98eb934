"""The on-disk cache of a prepared corpus: tokenizer.json, packed windows (.npy) and their stats.

Layout: ``<cache_dir>/<source>-<hash>/{tokenizer.json, {train,val}_{input_ids,position_ids}.npy, meta.json}``.
The hash covers everything that changes the tokenizer or the windows (see `cache_path`). A cache is built in a
temporary sibling directory and published with one ``os.replace``, so a killed run never leaves a partial cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from jetmoe.data.config import DataConfig
from jetmoe.data.packing import pack_documents
from jetmoe.data.sources import file_fingerprint, load_documents, source_fingerprint, take_chars
from jetmoe.data.tokenizer import SpecialTokens, load_tokenizer, read_tokenizer, train_tokenizer

CACHE_VERSION = 1  # bump when the cache layout or the preparation changes
NOT_IN_KEY = frozenset({"batch_size", "num_workers", "cache_dir", "intra_doc_mask"})  # fields that leave tokens as-is
SPLITS = ("train", "val")
ARRAYS = ("input_ids", "position_ids")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"  # written last: its presence marks a complete cache


@dataclass
class Corpus:
    """A loaded cache: the tokenizer and each split's memory-mapped windows."""

    path: Path
    tokenizer: Tokenizer
    windows: dict[str, dict[str, np.ndarray]]  # split -> {"input_ids": [N, T], "position_ids": [N, T]}
    stats: dict[str, float | int]


def cache_path(cfg: DataConfig, *, vocab_size: int, special: SpecialTokens, seed: int) -> Path:
    """`<cache_dir>/<source>-<hash of config, source files, model vocab/special ids, seed, version>`."""
    key = {
        "version": CACHE_VERSION,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY},
        "source": source_fingerprint(cfg),
        "tokenizer_file": _tokenizer_fingerprint(cfg.tokenizer_path),
        "vocab_size": vocab_size,
        "special": dataclasses.asdict(special),
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / f"{cfg.source}-{digest}"


def _tokenizer_fingerprint(tokenizer_path: Optional[str]) -> Optional[list]:
    if not tokenizer_path:
        return None
    if not Path(tokenizer_path).is_file():
        raise ValueError(f"data.tokenizer_path: file not found: {tokenizer_path}")
    return file_fingerprint(Path(tokenizer_path))


def is_built(path: Path) -> bool:
    return (path / META_FILE).is_file()


def build_corpus(cfg: DataConfig, path: Path, *, vocab_size: int, special: SpecialTokens, seed: int) -> None:
    """Read, split, (train the tokenizer,) tokenize and pack the corpus into the cache at `path`."""
    train_docs, val_docs = load_documents(cfg, seed)
    if cfg.tokenizer_path:
        tokenizer = load_tokenizer(cfg.tokenizer_path, vocab_size, special)
    else:
        tokenizer = train_tokenizer(take_chars(train_docs, cfg.tokenizer_train_chars), vocab_size, special)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        stats: dict[str, float | int] = {"tokenizer_vocab_size": tokenizer.get_vocab_size()}
        slots = 0
        for split, docs in zip(SPLITS, (train_docs, val_docs)):
            packed = pack_documents(tokenizer, docs, cfg.seq_len, special.eos_token_id, vocab_size)
            np.save(tmp / f"{split}_input_ids.npy", packed.input_ids)
            np.save(tmp / f"{split}_position_ids.npy", packed.position_ids)
            stats |= packed.stats(split)
            slots += packed.input_ids.size
        stats["packing_efficiency"] = (stats["train_tokens"] + stats["val_tokens"]) / slots
        (tmp / META_FILE).write_text(json.dumps(stats, indent=2))
        try:
            os.replace(tmp, path)  # atomic publish
        except OSError:
            if not is_built(path):  # another process publishing the same cache first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus(path: Path) -> Corpus:
    """The cache at `path` (windows memory-mapped, read-only)."""
    windows = {
        split: {name: np.load(path / f"{split}_{name}.npy", mmap_mode="r") for name in ARRAYS} for split in SPLITS
    }
    stats = json.loads((path / META_FILE).read_text())
    return Corpus(path=path, tokenizer=read_tokenizer(path / TOKENIZER_FILE), windows=windows, stats=stats)
