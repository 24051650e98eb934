"""`jetmoe prepare`: every source of a run tokenized once into the token store (`jetmoe.data.store`).

* Streaming: a source is read as a stream of documents, cut into chunks of about CHUNK_CHARS characters; at most
  ``2 * prepare_workers`` chunks are in memory at once, whatever the size of the source.
* Parallel: ``prepare_workers`` threads each encode a chunk with ``encode_batch_fast``, which releases the GIL and
  spreads a batch over the cores itself (bench/bench_data.py measures it against in-memory ``encode_batch``).
* Deterministic: chunk and shard boundaries depend on the documents only, so the same config gives byte-identical
  shards with any number of workers.
* Resumable: shards are committed in order (`ShardWriter`); a rerun reads the source again but tokenizes only the
  chunks of shards that are not on disk, and a missing or damaged shard (or manifest) is rebuilt the same way.
* One preparer per source at a time (a lock file), so ranks or nodes that share a store wait for the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from filelock import FileLock
from tokenizers import Tokenizer

from jetmoe.data.config import DataConfig, SourceConfig
from jetmoe.data.sources import (
    iter_documents, resolve_files, source_fingerprint, split_documents, stdlib_files, take_chars,
)
from jetmoe.data.store import (
    MANIFEST_FILE, SPLITS, STORE_FILE, STORE_VERSION, TOKENIZER_FILE, ShardMeta, ShardWriter, SourceStore,
    directory_bytes, finished_shards, open_source, read_json, read_manifest, token_dtype,
)
from jetmoe.data.tokenizer import SpecialTokens, load_tokenizer, read_tokenizer, tokenizer_sha256, train_tokenizer
from jetmoe.errors import ConfigError, InputFileError, MissingFileError
from jetmoe.files import atomic_write, atomic_write_json, remove_temporary_files

log = logging.getLogger("jetmoe.data")

CHUNK_CHARS = 1 << 22  # characters of documents per unit of work (part of the store format: STORE_VERSION)
ENCODE_CHARS = 1 << 20  # characters per encode_batch_fast call (bounds the memory of its Encoding objects)
PROGRESS_SECONDS = 10.0
PREPARE_HINT = "jetmoe prepare on this experiment"


@dataclass
class Store:
    """A prepared store opened for training: its tokenizer and every source's memory-mapped splits."""

    root: Path
    tokenizer: Tokenizer
    tokenizer_path: Path
    sources: dict[str, SourceStore]


@dataclass
class SourceSummary:
    name: str
    path: Path
    tokens: dict[str, int]
    documents: dict[str, int]
    bytes: int
    shards: int
    built_shards: int  # shards tokenized by this call (0: the source was already prepared)
    seconds: float


# ----------------------------------------------------------------------------- where things go


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _source_identity(name: str, src: SourceConfig, cfg: DataConfig) -> dict[str, Any]:
    """What fixes a source's documents and split (not its weight)."""
    config = {k: v for k, v in dataclasses.asdict(src).items() if k != "weight"}
    where = f"data.sources.{name}"
    return {"config": config, "files": source_fingerprint(src, where), "max_chars": cfg.max_chars,
            "val_fraction": cfg.val_fraction}


def _bpe_shares(cfg: DataConfig) -> dict[str, float]:
    """Each source's share of the BPE training text: equal, whatever the mixture weights and phases, so that a
    weight ablation keeps the tokenizer and the whole token store (a source's size is unknown before it is read)."""
    return {name: 1 / len(cfg.sources) for name in cfg.sources}


@dataclass
class TokenizerRecipe:
    """How the run's tokenizer is made: a user's file, or a BPE trained on the sources."""

    key: str
    description: str
    user_tokenizer: Optional[Tokenizer]


def tokenizer_recipe(cfg: DataConfig, vocab_size: int, special: SpecialTokens) -> TokenizerRecipe:
    if cfg.tokenizer_path:
        tokenizer = load_tokenizer(cfg.tokenizer_path, vocab_size, special)
        sha = tokenizer_sha256(tokenizer)
        return TokenizerRecipe(f"file-{sha}", f"{cfg.tokenizer_path} (sha256 {sha[:12]})", tokenizer)
    recipe = {
        "version": STORE_VERSION, "vocab_size": vocab_size, "special": dataclasses.asdict(special),
        "train_chars": cfg.tokenizer_train_chars, "shares": _bpe_shares(cfg),
        "sources": {name: _source_identity(name, src, cfg) for name, src in cfg.sources.items()},
    }
    chars = "all" if cfg.tokenizer_train_chars is None else f"{cfg.tokenizer_train_chars:,}"
    description = f"a BPE of vocab {vocab_size} trained on {chars} characters of {', '.join(cfg.sources)}"
    return TokenizerRecipe(f"bpe-{_digest(recipe)}", description, None)


def store_root(cfg: DataConfig, recipe: TokenizerRecipe) -> Path:
    return Path(cfg.store_dir) if cfg.store_dir else Path(cfg.cache_dir) / f"store-{recipe.key[:20]}"


def source_dir(root: Path, name: str, src: SourceConfig, cfg: DataConfig, sha: str, eos_token_id: int) -> Path:
    key = {"version": STORE_VERSION, "chunk_chars": CHUNK_CHARS, "shard_tokens": cfg.shard_tokens,
           "tokenizer_sha256": sha, "eos_token_id": eos_token_id, **_source_identity(name, src, cfg)}
    return root / f"{name}-{_digest(key)[:12]}"


# ----------------------------------------------------------------------------- the tokenizer


def _check_root(root: Path, recipe: TokenizerRecipe) -> Optional[dict[str, Any]]:
    """The root's store.json, or None for a new root; ConfigError when it belongs to another tokenizer."""
    if not (root / STORE_FILE).is_file():
        return None
    record = read_json(root / STORE_FILE)
    if record.get("tokenizer_key") != recipe.key:
        raise ConfigError(
            f"data.store_dir {root}: prepared for another tokenizer ({record.get('tokenizer')}), not this run's "
            f"({recipe.description}); use another data.store_dir or remove {root}"
        )
    return record


def ensure_tokenizer(cfg: DataConfig, root: Path, recipe: TokenizerRecipe, special: SpecialTokens,
                     vocab_size: int) -> Tokenizer:
    """The root's tokenizer: copied from the user's file or trained (then saved) on its first use."""
    if _check_root(root, recipe) is not None and (root / TOKENIZER_FILE).is_file():
        return read_tokenizer(root / TOKENIZER_FILE)
    if recipe.user_tokenizer is not None:
        tokenizer = recipe.user_tokenizer
    else:
        log.info(f"prepare: training {recipe.description}")
        tokenizer = train_tokenizer(bpe_training_text(cfg), vocab_size, special)
    atomic_write(root / TOKENIZER_FILE, lambda tmp: tokenizer.save(str(tmp)))
    tokenizer = read_tokenizer(root / TOKENIZER_FILE)  # as every later run will load it
    atomic_write_json(root / STORE_FILE, {"version": STORE_VERSION, "tokenizer_key": recipe.key,
                                          "tokenizer": recipe.description,
                                          "tokenizer_sha256": tokenizer_sha256(tokenizer)})
    return tokenizer


def bpe_training_text(cfg: DataConfig) -> Iterator[str]:
    """Training documents of each source up to its share of `tokenizer_train_chars` (all of them when None)."""
    for name, share in _bpe_shares(cfg).items():
        cap = None if cfg.tokenizer_train_chars is None else max(1, round(cfg.tokenizer_train_chars * share))
        yield from take_chars((doc for is_val, doc in split_stream(name, cfg) if not is_val), cap)


def split_stream(name: str, cfg: DataConfig) -> Iterator[tuple[bool, str]]:
    """(is_val, document) of a source, in source order (`jetmoe.data.sources.split_documents`)."""
    where = f"data.sources.{name}"
    docs = iter_documents(cfg.sources[name], max_chars=cfg.max_chars, cache_dir=cfg.cache_dir, where=where)
    return split_documents(docs, cfg.val_fraction, where)


def validation_documents(cfg: DataConfig) -> Iterator[str]:
    """The held-out documents of every source, source by source (streamed)."""
    for name in cfg.sources:
        yield from (doc for is_val, doc in split_stream(name, cfg) if is_val)


# ----------------------------------------------------------------------------- preparing


def prepare_store(cfg: DataConfig, *, vocab_size: int, special: SpecialTokens, repair: bool = True,
                  only: Optional[Sequence[str]] = None) -> list[SourceSummary]:
    """Tokenize every source (or the sources named in `only`) that is not in the store yet.

    With `repair`, a prepared source's shards are checked too and any missing or damaged one is rebuilt (what
    `jetmoe prepare` does); without, a prepared source is taken as it is (what `jetmoe train` does before opening
    the store, which then reports damage instead of silently tokenizing again).
    """
    recipe = tokenizer_recipe(cfg, vocab_size, special)
    root = store_root(cfg, recipe)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):  # ranks sharing the store: one trains the BPE, the others read it
        tokenizer = ensure_tokenizer(cfg, root, recipe, special, vocab_size)
    sha = tokenizer_sha256(tokenizer)
    dtype = token_dtype(max(tokenizer.get_vocab_size(with_added_tokens=True), special.eos_token_id + 1))
    unknown = [name for name in only or () if name not in cfg.sources]
    if unknown:
        raise ConfigError(f"--source {unknown[0]!r} is not a source of this experiment ({', '.join(cfg.sources)})")
    summaries = []
    for name, src in cfg.sources.items():
        if only and name not in only:
            continue
        path = source_dir(root, name, src, cfg, sha, special.eos_token_id)
        path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path / ".lock")):
            summaries.append(_prepare_source(name, path, cfg, tokenizer, sha, dtype, special.eos_token_id, repair))
    return summaries


def _prepare_source(name: str, path: Path, cfg: DataConfig, tokenizer: Tokenizer, sha: str, dtype: np.dtype,
                    eos_token_id: int, repair: bool) -> SourceSummary:
    start = time.perf_counter()
    manifest_file = path / MANIFEST_FILE
    if manifest_file.is_file() and not repair:
        return _summary(name, path, read_manifest(manifest_file), built=0, seconds=0.0)
    kept = finished_shards(path, dtype)
    manifest = _readable_manifest(manifest_file)
    if manifest is not None and len(kept) == len(manifest["shards"]):
        return _summary(name, path, manifest, built=0, seconds=0.0)
    manifest_file.unlink(missing_ok=True)  # missing shards, or itself damaged: rebuild what is missing, write it again
    remove_temporary_files(path)
    shards, built = _build_shards(name, path, cfg, tokenizer, dtype, eos_token_id, kept)
    manifest = {
        "version": STORE_VERSION, "source": name, "kind": cfg.sources[name].kind, "tokenizer_sha256": sha,
        "tokenizer_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "eos_token_id": eos_token_id,
        "dtype": dtype.name, "shards": [dataclasses.asdict(s) for s in shards],
        "tokens": {split: sum(s.tokens[split] for s in shards) for split in SPLITS},
        "documents": {split: sum(s.documents[split] for s in shards) for split in SPLITS},
    }
    atomic_write_json(manifest_file, manifest)
    summary = _summary(name, path, manifest, built=built, seconds=time.perf_counter() - start)
    log.info(f"prepare {name}: done, {summary.tokens['train']:,} train + {summary.tokens['val']:,} val tokens in "
             f"{summary.shards} shard(s), {summary.bytes / 1e6:,.1f} MB, {summary.seconds:.1f}s")
    return summary


def _readable_manifest(path: Path) -> Optional[dict[str, Any]]:
    """A source's manifest, None when it is missing or unreadable. The manifest only sums up the shard records (each
    shard's chunks and counts, which verify its files without the manifest), so a damaged one is repaired like a
    damaged shard: the intact shards are kept and the manifest is written again from them."""
    if not path.is_file():
        return None
    try:
        return read_manifest(path)
    except InputFileError:
        log.warning(f"prepare: {path} is damaged; writing it again from the intact shards")
        return None


def _summary(name: str, path: Path, manifest: dict[str, Any], *, built: int, seconds: float) -> SourceSummary:
    return SourceSummary(name=name, path=path, tokens=manifest["tokens"], documents=manifest["documents"],
                         bytes=directory_bytes(path), shards=len(manifest["shards"]), built_shards=built,
                         seconds=seconds)


@dataclass
class Chunk:
    index: int
    docs: list[tuple[bool, str]]  # (is_val, text)
    chars: int


def chunk_documents(docs: Iterable[tuple[bool, str]], chunk_chars: int) -> Iterator[Chunk]:
    """Consecutive documents in chunks of at least `chunk_chars` characters (the last one may be smaller)."""
    index, batch, chars = 0, [], 0
    for is_val, doc in docs:
        batch.append((is_val, doc))
        chars += len(doc)
        if chars >= chunk_chars:
            yield Chunk(index, batch, chars)
            index, batch, chars = index + 1, [], 0
    if batch:
        yield Chunk(index, batch, chars)


def encode_chunk(tokenizer: Tokenizer, docs: list[tuple[bool, str]], eos_token_id: int,
                 dtype: np.dtype) -> dict[str, tuple[np.ndarray, int]]:
    """split -> (its documents' ids, each followed by EOS, concatenated; number of documents)."""
    pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    eos = np.array([eos_token_id], dtype=dtype)
    for batch in _batches_of_chars(docs, ENCODE_CHARS):
        encodings = tokenizer.encode_batch_fast([doc for _, doc in batch], add_special_tokens=False)
        for (is_val, _), enc in zip(batch, encodings):
            pieces[SPLITS[is_val]] += [np.array(enc.ids, dtype=dtype), eos]  # SPLITS[False] == "train"
    return {split: (np.concatenate(p) if p else np.zeros(0, dtype), len(p) // 2) for split, p in pieces.items()}


def _batches_of_chars(docs: list[tuple[bool, str]], chars: int) -> Iterator[list[tuple[bool, str]]]:
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[1])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _build_shards(name: str, path: Path, cfg: DataConfig, tokenizer: Tokenizer, dtype: np.dtype,
                  eos_token_id: int, kept: dict[int, ShardMeta]) -> tuple[list[ShardMeta], int]:
    """Stream the source's chunks in order; tokenize those of shards not kept, in parallel, and commit shards.

    A shard ends after the chunk that brings its training tokens to `shard_tokens`, before a kept shard, or at
    the end of the source.
    """
    kept_at = {meta.chunk_start: meta for meta in kept.values()}
    covered = {c for meta in kept.values() for c in range(meta.chunk_start, meta.chunk_end)}
    progress = _Progress(name, cfg)
    shards: list[ShardMeta] = []
    writer: Optional[ShardWriter] = None
    pending: deque[tuple[Chunk, Optional[Future]]] = deque()
    built = 0

    def finish(chunk: Chunk, future: Optional[Future]) -> None:
        nonlocal writer, built
        if future is None:
            progress.update(chunk, tokens=None)
            meta = kept_at.get(chunk.index)
            if meta is not None:
                if meta.index != len(shards):
                    raise InputFileError(f"{path}: shard records out of order at chunk {chunk.index}; remove "
                                         f"{path} and run jetmoe prepare again")
                shards.append(meta)
            return
        if writer is None:
            writer = ShardWriter(path, len(shards), chunk.index, dtype)
        encoded = future.result()
        progress.update(chunk, tokens=sum(len(tokens) for tokens, _ in encoded.values()))
        for split, (tokens, documents) in encoded.items():
            writer.append(split, tokens, documents)
        if writer.meta.tokens["train"] >= cfg.shard_tokens or chunk.index + 1 in kept_at:
            shards.append(writer.commit(chunk.index + 1))
            writer, built = None, built + 1

    with ThreadPoolExecutor(cfg.prepare_workers, thread_name_prefix="jetmoe-prepare") as pool:
        try:
            last = -1
            for chunk in chunk_documents(split_stream(name, cfg), CHUNK_CHARS):
                last = chunk.index
                future = None if chunk.index in covered else pool.submit(
                    encode_chunk, tokenizer, chunk.docs, eos_token_id, dtype)
                pending.append((chunk, future))
                while len(pending) > 2 * cfg.prepare_workers or (pending and pending[0][1] is None):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
            if writer is not None:
                shards.append(writer.commit(last + 1))
                writer, built = None, built + 1
        except BaseException:
            for _, future in pending:
                if future is not None:
                    future.cancel()
            if writer is not None:
                writer.abort()
            raise
    return shards, built


class _Progress:
    """A log line every PROGRESS_SECONDS: documents, tokens, tokens/s and, when the size is known, the ETA.

    Chunks of kept shards (a resumed prepare) count as read, not as tokenized: the rate is this run's work.
    """

    def __init__(self, name: str, cfg: DataConfig):
        self.name = name
        self.total_chars = _expected_chars(cfg.sources[name], cfg.max_chars)
        self.start = self.last = time.perf_counter()
        self.documents = self.chars = self.tokens = self.encoded_chars = 0

    def update(self, chunk: Chunk, tokens: Optional[int]) -> None:
        self.documents += len(chunk.docs)
        self.chars += chunk.chars
        if tokens is not None:
            self.tokens += tokens
            self.encoded_chars += chunk.chars
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        elapsed = now - self.start
        parts = [f"prepare {self.name}: {self.documents:,} documents", f"{self.tokens / 1e6:,.1f}M tokens",
                 f"{self.tokens / elapsed / 1e6:.2f}M tokens/s"]
        if self.total_chars:
            chars_per_s = max(self.encoded_chars / elapsed, 1.0)
            left = max(0, self.total_chars - self.chars)
            parts.append(f"{min(1.0, self.chars / self.total_chars):.0%} read, ETA {left / chars_per_s / 60:.1f} min")
        log.info(" | ".join(parts))


def _expected_chars(src: SourceConfig, max_chars: Optional[int]) -> Optional[int]:
    """About how many characters a source holds (its files' bytes), None when unknown (a hub stream)."""
    if src.kind == "stdlib":
        total: Optional[int] = sum(p.stat().st_size for p in stdlib_files(src.stdlib_include_tests))
    elif src.kind == "files":
        total = sum(p.stat().st_size for p in resolve_files(src.data_files))
    else:
        total = None
    return min(total, max_chars) if total is not None and max_chars is not None else (max_chars or total)


# ----------------------------------------------------------------------------- opening


def open_store(cfg: DataConfig, *, vocab_size: int, special: SpecialTokens) -> Store:
    """The prepared store of `cfg` (MissingFileError naming what is not prepared; see `prepare_store`)."""
    recipe = tokenizer_recipe(cfg, vocab_size, special)
    root = store_root(cfg, recipe)
    if _check_root(root, recipe) is None or not (root / TOKENIZER_FILE).is_file():
        raise MissingFileError(f"{root}: no prepared store for this run's tokenizer; run {PREPARE_HINT}")
    tokenizer = read_tokenizer(root / TOKENIZER_FILE)  # its key matched: it fits the model (tokenizer_recipe)
    sha = tokenizer_sha256(tokenizer)
    sources = {
        name: open_source(name, source_dir(root, name, src, cfg, sha, special.eos_token_id),
                          tokenizer_sha256=sha, prepare_hint=PREPARE_HINT)
        for name, src in cfg.sources.items()
    }
    return Store(root=root, tokenizer=tokenizer, tokenizer_path=root / TOKENIZER_FILE, sources=sources)


