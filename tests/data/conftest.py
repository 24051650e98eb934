"""Fixtures shared by the data tests: tiny corpora written to tmp_path and a tiny trained tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from jetmoe.data.config import DataConfig
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
    """A `files` config over 60 documents in one .jsonl, with a small cache in tmp_path."""
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _make_docs(60))
    return DataConfig(
        source="files", data_files=[str(corpus)], seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache")
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(_make_docs(40), vocab_size=400, special=SpecialTokens())
