"""Sources -> streams of documents (plain strings), and the streaming train/val split.

Kinds (``SourceConfig.kind``):
  stdlib  the running interpreter's standard library ``.py`` files, one document per file
  files   local files: json/jsonl/parquet rows (``text_field``, streamed by ``datasets``), any other file UTF-8 text
  hub     ``datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)``; ``hub_name`` may be a
          local directory of data files (the same streaming code path, used by the tests)
  disk    ``datasets.load_from_disk(disk_path)`` (memory-mapped Arrow)

Every reader is a generator: memory holds a few documents, never the corpus. A text file longer than
LONG_TEXT_CHARS is read in blocks of lines of about TEXT_BLOCK_CHARS, each its own document.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

import datasets

from jetmoe.data.config import SourceConfig
from jetmoe.errors import ConfigError, InputFileError, MissingFileError

MIN_DOCUMENTS = 20  # a source with fewer documents is cut into blocks of lines, so a val split exists
SMALL_CORPUS_BLOCKS = 100  # about how many blocks such a source is cut into
LONG_TEXT_CHARS = 1 << 23  # a text file longer than this is read in blocks (bounded memory)
TEXT_BLOCK_CHARS = 1 << 20
READ_BYTES = 1 << 20
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
ROW_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # any other suffix: UTF-8 text
COMPRESSION = (".gz", ".bz2", ".xz")  # around json/jsonl rows: decompressed by datasets


def iter_documents(src: SourceConfig, *, max_chars: Optional[int], cache_dir: str, where: str) -> Iterator[str]:
    """The non-blank documents of a source in source order, capped at `max_chars`, a small source cut into blocks.

    `where` names the source in errors (``data.sources.<name>``).
    """
    if src.kind == "stdlib":
        docs: Iterable[str] = (read_lenient(p) for p in stdlib_files(src.stdlib_include_tests))
    elif src.kind == "files":
        docs = iter_files(resolve_files(src.data_files, f"{where}.data_files"), src.text_field, src.text_split)
    elif src.kind == "hub":
        try:
            ds = datasets.load_dataset(src.hub_name, src.hub_config, split=src.hub_split, streaming=True,
                                       cache_dir=datasets_cache(cache_dir))
        except (FileNotFoundError, ConnectionError, ValueError) as err:  # no such dataset, config or split; offline
            message = " ".join(str(err).split()) or type(err).__name__
            raise MissingFileError(f"{where}.hub_name {src.hub_name!r}: cannot be streamed: {message}") from None
        docs = stream_column(ds, src.text_field, where=f"{where} ({src.hub_name})")
    else:
        ds = load_disk(src.disk_path, src.hub_split, where).to_iterable_dataset()
        docs = stream_column(ds, src.text_field, where=f"{where} ({src.disk_path})")
    return cut_small_corpus(take_chars(docs, max_chars))


def read_files(paths: Iterable[Path], text_field: str, text_split: str) -> list[str]:
    """Every document of local files, in order (held-out evaluation text, not cut into blocks)."""
    return list(iter_files(paths, text_field, text_split))


def take_chars(docs: Iterable[str], max_chars: Optional[int]) -> Iterator[str]:
    """Non-blank documents in order until `max_chars` characters (the last one truncated); all when None."""
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        if not is_blank(doc):
            doc = doc if max_chars is None else doc[: max_chars - total]
            total += len(doc)
            yield doc


def is_blank(text: Optional[str]) -> bool:
    return not text or text.isspace()


def cut_small_corpus(docs: Iterable[str]) -> Iterator[str]:
    """Fewer than MIN_DOCUMENTS documents (e.g. one .txt): cut them into ~SMALL_CORPUS_BLOCKS blocks of lines.

    Only the first MIN_DOCUMENTS documents are held back to decide; a larger source streams through.
    """
    docs = iter(docs)
    head = list(itertools.islice(docs, MIN_DOCUMENTS))
    if len(head) == MIN_DOCUMENTS:
        yield from head
        yield from docs
        return
    size = max(1, sum(map(len, head)) // SMALL_CORPUS_BLOCKS)
    yield from (block for doc in head for block in blocks_of_lines(doc, size) if not is_blank(block))


def blocks_of_lines(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each ending at the first newline at or after `size` characters."""
    start = 0
    while start < len(text):
        newline = text.find("\n", start + size - 1)
        end = len(text) if newline < 0 else newline + 1
        yield text[start:end]
        start = end


def split_documents(docs: Iterable[str], val_fraction: float, where: str) -> Iterator[tuple[bool, str]]:
    """(is_val, document) in source order: document i is held out when floor((i+1)f + 1/2) > floor(i f + 1/2).

    The held-out documents are spread evenly through the source (every 20th for f = 0.05), so the split streams,
    needs no document count and does not depend on the run's seed. The last document is held out when the rule
    picked none. `val_fraction` <= 1/2 keeps document 0 (or 1) for training.
    """
    held_out, count = 0, 0
    last: Optional[tuple[bool, str]] = None
    for i, doc in enumerate(docs):
        if last is not None:
            yield last
        is_val = int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)
        held_out += is_val
        count = i + 1
        last = (is_val, doc)
    if count < 2:
        raise InputFileError(f"{where}: {count} document(s) with text; at least 2 are needed for a validation split")
    yield last if held_out else (True, last[1])


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


def read_lenient(path: Path) -> str:
    """UTF-8 with undecodable bytes dropped (a few stdlib files are latin-1)."""
    return path.read_bytes().decode("utf-8", errors="ignore")


# ----------------------------------------------------------------------------- local files


def resolve_files(patterns: Iterable[str], key: str = "data_files") -> list[Path]:
    """Absolute paths of the files that `patterns` (paths or globs, `**` allowed) name, in order, without repeats."""
    paths: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [m for m in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise MissingFileError(f"{key}: pattern {pattern!r} matches no files")
            paths += matches
        elif os.path.isdir(expanded):
            raise InputFileError(f"{key}: {pattern} is a directory; use a glob such as {pattern}/**/*.txt")
        elif not os.path.isfile(expanded):
            raise MissingFileError(f"{key}: file not found: {pattern}")
        else:
            paths.append(expanded)
    return list(dict.fromkeys(Path(p).resolve() for p in paths))


def iter_files(paths: Iterable[Path], text_field: str, text_split: str) -> Iterator[str]:
    for path in paths:
        yield from iter_file(path, text_field, text_split)


def iter_file(path: Path, text_field: str, text_split: str) -> Iterator[str]:
    """One file's non-blank documents; InputFileError naming the file when it is empty or has no text."""
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: file is empty")
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSION
    builder = ROW_BUILDERS.get(suffixes[-2] if compressed and len(suffixes) > 1 else path.suffix.lower())
    if compressed and builder is None:
        raise InputFileError(f"{path}: compressed text is read only as json/jsonl rows; decompress it first")
    if builder is None:
        docs = text_documents(path, text_split)
    else:
        docs = stream_column(_load_rows(builder, path), text_field, where=str(path))
    found = False
    for doc in docs:
        found = True
        yield doc
    if not found:
        raise InputFileError(f"{path}: contains no text")


def text_documents(path: Path, text_split: str) -> Iterator[str]:
    """A UTF-8 text file as documents: the whole file, each line or each blank-line-separated paragraph."""
    if text_split == "line":
        docs: Iterator[str] = (line.rstrip("\r\n") for line in text_lines(path))
    elif text_split == "paragraph":
        docs = _paragraphs(text_lines(path))
    elif path.stat().st_size <= LONG_TEXT_CHARS:
        docs = iter(["".join(text_lines(path))])
    else:
        docs = _line_blocks(text_lines(path), TEXT_BLOCK_CHARS)
    return (doc for doc in docs if not is_blank(doc))


def text_lines(path: Path) -> Iterator[str]:
    """Lines (with their newline) of a UTF-8 text file, read in blocks; InputFileError naming the file and the
    offset of the first byte that is not UTF-8 text (undecodable, or a NUL of a binary file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, tail = 0, ""
    with open(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            if b"\x00" in data:
                raise InputFileError(f"{path}: looks binary (contains NUL bytes); text files must be UTF-8 text")
            try:
                text = tail + decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise InputFileError(
                    f"{path}: not UTF-8 (bad byte at offset {offset + err.start}); text files must be UTF-8 text"
                ) from None
            offset += len(data)
            lines = text.splitlines(keepends=True)
            tail = lines.pop() if lines and data and not lines[-1].endswith(("\n", "\r")) else ""
            yield from lines
            if not data:
                return


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


def _line_blocks(lines: Iterable[str], size: int) -> Iterator[str]:
    block: list[str] = []
    chars = 0
    for line in lines:
        block.append(line)
        chars += len(line)
        if chars >= size:
            yield "".join(block)
            block, chars = [], 0
    if block:
        yield "".join(block)


def _load_rows(builder: str, path: Path) -> datasets.IterableDataset:
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)


# ----------------------------------------------------------------------------- datasets helpers


def stream_column(ds: datasets.IterableDataset, field: str, *, where: str) -> Iterator[str]:
    """The non-blank strings of column `field`, streamed; ConfigError naming the field, `where` and the columns."""
    try:
        for i, row in enumerate(ds):
            if i == 0:
                _check_column(row, field, where)
            if not is_blank(row[field]):
                yield row[field]
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise InputFileError(f"{where}: could not be read: {str(cause).splitlines()[0]}") from err


def _check_column(row: dict, field: str, where: str) -> None:
    if field not in row:
        raise ConfigError(f"text_field {field!r} is not a column of {where}; available columns: {', '.join(row)}")
    if not isinstance(row[field], (str, type(None))):
        raise ConfigError(f"text_field {field!r} of {where} must be a string column, got {type(row[field]).__name__}")


def load_disk(disk_path: str, split: str, where: str) -> datasets.Dataset:
    if not Path(disk_path).is_dir():
        raise MissingFileError(f"{where}.disk_path: directory not found: {disk_path}")
    ds = datasets.load_from_disk(disk_path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{where}.hub_split {split!r} is not a split of {disk_path}; available: {', '.join(ds)}")
        ds = ds[split]
    return ds


def datasets_cache(cache_dir: str) -> str:
    return str(Path(cache_dir) / "datasets")


# ----------------------------------------------------------------------------- fingerprint


def source_fingerprint(src: SourceConfig, where: str) -> list:
    """What identifies the source's current content beyond its config: files' paths, sizes and mtimes."""
    if src.kind == "stdlib":
        return [str(stdlib_root()), platform.python_version()]
    if src.kind == "files":
        return [file_fingerprint(p) for p in resolve_files(src.data_files, f"{where}.data_files")]
    if src.kind == "disk" and Path(src.disk_path).is_dir():
        return [file_fingerprint(p) for p in sorted(Path(src.disk_path).rglob("*")) if p.is_file()]
    if src.kind == "hub" and Path(src.hub_name).is_dir():
        return [file_fingerprint(p) for p in sorted(Path(src.hub_name).rglob("*")) if p.is_file()]
    return []  # a hub dataset: identified by name, config and split alone


def file_fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
