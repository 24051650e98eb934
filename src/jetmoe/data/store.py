"""The token store: each source's documents as flat, memory-mapped token shards (Megatron / OLMo-core style).

Layout of a store root (``data.store_dir``, default ``<cache_dir>/store-<tokenizer key>``)::

    store.json                  the tokenizer's key (how it was made) and SHA-256: a root holds one tokenizer
    tokenizer.json
    <source>-<key>/             one directory per source; the key hashes its config, files and the tokenizer
        train-00000.bin         raw token ids (uint16, or uint32 for vocabularies over 65,536), each document
        val-00000.bin           followed by EOS; shard i of both splits covers the same input chunks
        shard-00000.json        shard i's chunk range and counts: written after its .bin files, it marks them done
        manifest.json           written last: the source is complete (every shard, totals, tokenizer, dtype)

Every file is written to a temporary name and renamed, so a killed `jetmoe prepare` leaves finished shards and
nothing half-written under a final name. Opening a source checks every shard's size against its record: a missing
or truncated shard is a one-line error that says how to rebuild it (`jetmoe prepare` redoes only that shard).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jetmoe.errors import ConfigError, InputFileError, MissingFileError
from jetmoe.files import atomic_write_json, publish, temporary_file

STORE_VERSION = 1  # bump when the layout or the way documents become tokens changes
SPLITS = ("train", "val")
STORE_FILE, TOKENIZER_FILE, MANIFEST_FILE = "store.json", "tokenizer.json", "manifest.json"


def token_dtype(num_ids: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16) if num_ids <= 1 << 16 else np.dtype(np.uint32)


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def shard_record(index: int) -> str:
    return f"shard-{index:05d}.json"


@dataclass
class ShardMeta:
    """Shard `index`: input chunks [chunk_start, chunk_end), its tokens and documents per split."""

    index: int
    chunk_start: int
    chunk_end: int
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(f"{path}: not valid JSON ({err}); remove it and run jetmoe prepare again") from None


MANIFEST_KEYS = ("shards", "tokens", "documents", "dtype")


def read_manifest(path: Path) -> dict[str, Any]:
    """A source's manifest.json; InputFileError when it is not one (`jetmoe prepare` then writes it again)."""
    manifest = read_json(path)
    fields = manifest if isinstance(manifest, dict) else {}
    missing = [key for key in MANIFEST_KEYS if key not in fields]
    if missing or not isinstance(fields["shards"], list):
        key = missing[0] if missing else "shards"
        raise InputFileError(f"{path}: not a manifest (no valid {key!r}); run jetmoe prepare again")
    return manifest


class ShardWriter:
    """Appends one shard's tokens to temporary files; `commit` publishes them (`jetmoe.files`) and writes the shard's
    record."""

    def __init__(self, directory: Path, index: int, chunk_start: int, dtype: np.dtype):
        self.directory, self.dtype = directory, dtype
        self.meta = ShardMeta(index=index, chunk_start=chunk_start, chunk_end=chunk_start)
        self._files = {split: open(temporary_file(directory / shard_file(split, index)), "wb") for split in SPLITS}

    def append(self, split: str, tokens: np.ndarray, documents: int) -> None:
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
        self.meta.tokens[split] += len(tokens)
        self.meta.documents[split] += documents

    def commit(self, chunk_end: int) -> ShardMeta:
        self.meta.chunk_end = chunk_end
        for split, f in self._files.items():
            f.close()
            publish(f.name, self.directory / shard_file(split, self.meta.index))
        atomic_write_json(self.directory / shard_record(self.meta.index), asdict(self.meta))
        return self.meta

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)


def finished_shards(directory: Path, dtype: np.dtype) -> dict[int, ShardMeta]:
    """The shards under `directory` whose record exists and whose files have the recorded sizes."""
    shards = {}
    for record in sorted(directory.glob("shard-*.json")):
        try:
            meta = ShardMeta(**json.loads(record.read_text()))
        except (ValueError, TypeError):
            continue  # unreadable: rebuilt
        if damaged_file(directory, meta.index, meta.tokens, dtype) is None:
            shards[meta.index] = meta
    return shards


def damaged_file(directory: Path, index: int, tokens: dict[str, int], dtype: np.dtype) -> tuple[Path, int, int] | None:
    """The first file of shard `index` not of its recorded size: (path, its size or -1 when missing, expected)."""
    for split in SPLITS:
        path, expected = directory / shard_file(split, index), tokens[split] * dtype.itemsize
        size = _size(path)
        if size != expected:
            return path, size, expected
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


# ----------------------------------------------------------------------------- reading


class TokenStream:
    """One split of one source: its shards memory-mapped end to end as one stream of `num_tokens` ids.

    Window j of length T is tokens [jT, (j+1)T); the last window wraps around to the stream's start, so every
    token is in a window and even a tiny split has one (`num_windows` = ceil(num_tokens / T)).
    """

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if arrays else 0

    def num_windows(self, seq_len: int) -> int:
        return -(-self.num_tokens // seq_len)

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` ids from position `start`, wrapping around at the end of the stream."""
        pieces = []
        pos = start % self.num_tokens
        while length > 0:
            shard = int(np.searchsorted(self.ends, pos, side="right"))
            offset = pos - (int(self.ends[shard - 1]) if shard else 0)
            piece = self.arrays[shard][offset : offset + length]
            pieces.append(piece)
            length -= len(piece)
            pos = (pos + len(piece)) % self.num_tokens
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class SourceStore:
    """A prepared source: its manifest and a TokenStream per split."""

    name: str
    path: Path
    manifest: dict[str, Any]
    splits: dict[str, TokenStream]


def open_source(name: str, path: Path, *, tokenizer_sha256: str, prepare_hint: str) -> SourceStore:
    """Memory-map a prepared source, checking it was made with this tokenizer and that every shard is whole."""
    manifest = read_manifest(path / MANIFEST_FILE)
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise ConfigError(
            f"{path}: source {name!r} was prepared with tokenizer {str(manifest.get('tokenizer_sha256'))[:12]} "
            f"(vocab {manifest.get('tokenizer_vocab_size')}), not this run's {tokenizer_sha256[:12]}; "
            f"prepare it again for this tokenizer ({prepare_hint})"
        )
    dtype = np.dtype(manifest["dtype"])
    for shard in manifest["shards"]:
        damage = damaged_file(path, shard["index"], shard["tokens"], dtype)
        if damage is not None:
            file, size, expected = damage
            if size < 0:
                raise MissingFileError(f"{file}: shard of source {name!r} is missing; rebuild it with {prepare_hint}")
            raise InputFileError(
                f"{file}: shard of source {name!r} is truncated or damaged ({size:,} bytes, the manifest says "
                f"{expected:,}); rebuild it with {prepare_hint}"
            )
    splits = {
        split: TokenStream([np.memmap(path / shard_file(split, s["index"]), dtype=dtype, mode="r")
                            for s in manifest["shards"] if s["tokens"][split]])
        for split in SPLITS
    }
    return SourceStore(name=name, path=path, manifest=manifest, splits=splits)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
