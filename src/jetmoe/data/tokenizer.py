"""Byte-level BPE tokenizer: trained on the corpus or loaded from a tokenizer.json.

Byte-level pre-tokenizer + decoder, so ``decode(encode(text)) == text`` for any text (code, whitespace, newlines).
Special-token strings that occur in the text are encoded as plain text (``encode_special_tokens``): the only
special ids in packed data are the EOS tokens appended by packing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jetmoe.errors import ConfigError, InputFileError, MissingFileError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
NUM_BYTES = 256


@dataclass(frozen=True)
class SpecialTokens:
    """The model's special token ids."""

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def by_id(self) -> dict[int, str]:
        """Token string at each id, in id order."""
        names = {self.pad_token_id: PAD, self.bos_token_id: BOS, self.eos_token_id: EOS}
        return dict(sorted(names.items()))


def train_tokenizer(texts: Iterable[str], vocab_size: int, special: SpecialTokens) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens; `<pad>`, `<s>`, `</s>` at the ids of `special`.

    BPE training puts the special tokens first, so their ids must be 0, 1, 2 (in any order).
    """
    if vocab_size < NUM_BYTES + 3:
        raise ConfigError(f"model.vocab_size must be >= {NUM_BYTES + 3} for a byte-level BPE, got {vocab_size}")
    ids = special.by_id()
    if sorted(ids) != [0, 1, 2]:
        raise ConfigError(
            "a trained tokenizer puts <pad>, <s>, </s> at ids 0, 1, 2: pad/bos/eos_token_id must be 0, 1, 2 in "
            f"some order, got {special.pad_token_id}/{special.bos_token_id}/{special.eos_token_id} "
            "(or set data.tokenizer_path)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(ids.values()),  # added first, in this order: ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token_id, token in ids.items():
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"BPE training put {token} at id {tokenizer.token_to_id(token)}, expected {token_id}")
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | Path, vocab_size: int, special: SpecialTokens) -> Tokenizer:
    """A user's tokenizer.json; a UserError naming the file if it does not fit the model's vocab or EOS id."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data.tokenizer_path: file not found: {path}")
    tokenizer = read_tokenizer(path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ConfigError(f"{path}: tokenizer vocab {size} > model.vocab_size {vocab_size}")
    specials = sorted(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    if special.eos_token_id not in specials:
        raise ConfigError(
            f"{path}: model eos_token_id {special.eos_token_id} is not a special token of this tokenizer "
            f"(its special token ids: {specials})"
        )
    return tokenizer


def read_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; special-token strings in input text are encoded as plain text."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for unparsable files
        raise InputFileError(f"{path}: not a valid tokenizer.json ({err})") from None
    tokenizer.encode_special_tokens = True
    return tokenizer


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The identity of a tokenizer: the SHA-256 of its canonical JSON (what a token store records)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
