"""Packing: documents -> one token stream (EOS after each document) -> fixed-length windows, no padding.

The stream is cut into ``ceil(L / T)`` windows of T tokens; the last window is completed by wrapping around to
the start of the stream, so no token is dropped and even a tiny split gives one window. ``position_ids``
restart at 0 at every document start: after each EOS and at the start of each window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from jetmoe.errors import InputFileError

ENCODE_BATCH = 256  # documents per encode_batch call (bounds the memory of the Encoding objects)


@dataclass
class PackedWindows:
    input_ids: np.ndarray  # [N, T] uint16 or int32
    position_ids: np.ndarray  # [N, T] uint16 or int32
    num_tokens: int  # real tokens in the stream (documents + one EOS each); the other slots are wrapped repeats
    num_documents: int
    cut_documents: int  # documents whose tokens fall into more than one window

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / slots: 1.0 except for the wrapped tail of the last window."""
        return self.num_tokens / self.input_ids.size

    def stats(self, prefix: str) -> dict[str, float | int]:
        return {
            f"{prefix}_documents": self.num_documents,
            f"{prefix}_tokens": self.num_tokens,
            f"{prefix}_windows": len(self.input_ids),
            f"{prefix}_cut_documents": self.cut_documents,
            f"{prefix}_mean_document_tokens": self.num_tokens / self.num_documents,
            f"{prefix}_packing_efficiency": self.packing_efficiency,
        }


def index_dtype(max_value: int) -> np.dtype:
    """The smallest of uint16 / int32 holding 0..max_value."""
    return np.dtype(np.uint16) if max_value <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def pack_documents(
    tokenizer: Tokenizer, docs: Sequence[str], seq_len: int, eos_token_id: int, vocab_size: int
) -> PackedWindows:
    """Encode `docs`, append EOS to each, and pack the stream into windows of `seq_len` tokens."""
    stream, doc_lengths = encode_documents(tokenizer, docs, eos_token_id, index_dtype(vocab_size - 1))
    return pack_stream(stream, doc_lengths, seq_len, eos_token_id)


def encode_documents(
    tokenizer: Tokenizer, docs: Sequence[str], eos_token_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(stream [L], doc_lengths [D]): all documents' ids, each followed by EOS, concatenated."""
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), ENCODE_BATCH):
        encodings = tokenizer.encode_batch_fast(list(docs[start : start + ENCODE_BATCH]), add_special_tokens=False)
        pieces += [np.array(enc.ids + [eos_token_id], dtype=dtype) for enc in encodings]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return stream, np.array([len(p) for p in pieces], dtype=np.int64)


def pack_stream(stream: np.ndarray, doc_lengths: np.ndarray, seq_len: int, eos_token_id: int) -> PackedWindows:
    """Cut the stream into [N, seq_len] windows, wrapping around to fill the last one."""
    if len(stream) == 0:
        raise InputFileError("nothing to pack: the documents encode to no tokens")
    num_windows = -(-len(stream) // seq_len)
    input_ids_NT = np.resize(stream, num_windows * seq_len).reshape(num_windows, seq_len)  # resize repeats the stream
    doc_ends = np.cumsum(doc_lengths)
    doc_starts = doc_ends - doc_lengths
    return PackedWindows(
        input_ids=input_ids_NT,
        position_ids=document_position_ids(input_ids_NT, eos_token_id),
        num_tokens=len(stream),
        num_documents=len(doc_lengths),
        cut_documents=int(np.count_nonzero(doc_starts // seq_len != (doc_ends - 1) // seq_len)),
    )


def document_position_ids(input_ids_NT: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Each token's offset from the last document start (window start or the token after an EOS)."""
    N, T = input_ids_NT.shape
    t_T = np.arange(T)
    is_start_NT = np.empty((N, T), dtype=bool)
    is_start_NT[:, 0] = True
    is_start_NT[:, 1:] = input_ids_NT[:, :-1] == eos_token_id
    last_start_NT = np.maximum.accumulate(np.where(is_start_NT, t_T, 0), axis=1)
    return (t_T - last_start_NT).astype(index_dtype(T - 1))
