"""Fixtures shared by the data tests: tiny corpora written to tmp_path and a tiny trained tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from jetmoe.data.config import DataConfig, SourceConfig
from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer

WORDS = "alpha beta gamma delta value index count total result items".split()


def _make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct Python-like documents of varied length (tabs, blank lines, unicode included)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [f"def func_{i}(x):", '    """Docstring with ünïcode."""']
        for _ in range(rng.randint(1, 12)):
            a, b = rng.sample(WORDS, 2)
            lines.append(f"    {a} = {b} + {rng.randint(0, 999)}\t# {a}")
        lines += ["", f"    return {rng.choice(WORDS)}", ""]
        docs.append("\n".join(lines))
    return docs


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def make_docs() -> Callable[..., list[str]]:
    return _make_docs


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[..., Path]:
    return _write_jsonl


@pytest.fixture
def jsonl_config(tmp_path: Path) -> DataConfig:
    """One `files` source over 60 documents in one .jsonl, with a small cache in tmp_path."""
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _make_docs(60))
    return DataConfig(sources={"code": SourceConfig(kind="files", data_files=[str(corpus)])}, seq_len=32,
                      batch_size=4, cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def two_source_config(tmp_path: Path) -> DataConfig:
    """Two `files` sources (web: 120 documents of words, code: 60 functions) weighted 3:1."""
    code = _write_jsonl(tmp_path / "code.jsonl", _make_docs(60))
    rng = random.Random(1)
    web = _write_jsonl(tmp_path / "web.jsonl", [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) + "."
                                                for _ in range(120)])
    return DataConfig(
        sources={"web": SourceConfig(kind="files", data_files=[str(web)], weight=3.0),
                 "code": SourceConfig(kind="files", data_files=[str(code)], weight=1.0)},
        seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"),
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(_make_docs(40), vocab_size=400, special=SpecialTokens())
