"""Fixtures shared by the eval tests: a BPE tokenizer, a tiny random JetMoE, its complete HF directory, a small task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from jetmoe import JetMoeConfig, JetMoeForCausalLM, save_pretrained
from jetmoe.data.sources import stdlib_files
from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer
from jetmoe.eval.tasks import MultipleChoiceItem, MultipleChoiceTask, stdlib_next_line

VOCAB = 512


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = [path.read_text(encoding="utf-8", errors="ignore") for path in stdlib_files()[:40]]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(texts, VOCAB, SpecialTokens()).save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    from jetmoe.data.tokenizer import read_tokenizer

    return read_tokenizer(tokenizer_file)


@pytest.fixture(scope="session")
def model() -> JetMoeForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = JetMoeConfig.from_name("test", vocab_size=VOCAB, pad_token_id=0, initializer_range=0.2)
        return JetMoeForCausalLM(config).eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, model, tokenizer_file) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    save_pretrained(model, directory, tokenizer_file)  # complete: tokenizer files, generation config, model card
    return directory


@pytest.fixture(scope="session")
def task() -> MultipleChoiceTask:
    """24 built-in items, plus one with an empty context (conditioned on the prefix token) and one of 3 choices."""
    builtin = stdlib_next_line(num_items=24)
    extra = (MultipleChoiceItem("", ("import os\n", "x = 1\n", "pass\n", "return\n"), 0),
             MultipleChoiceItem("for i in range(3):\n", ("    print(i)\n", "print(i)\n", "  i\n"), 0))
    return MultipleChoiceTask("mini", builtin.items + extra, target_delimiter="", source="test")


@pytest.fixture(scope="session")
def encode(tokenizer):
    """text -> token ids, as the callback and lm-eval encode (no special tokens added)."""
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
