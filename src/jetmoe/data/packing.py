"""Document positions of packed token windows: `position_ids` restart at 0 at every document start, after each EOS
and at the start of each window (the packing convention the model's intra-document mask reads)."""

from __future__ import annotations

import numpy as np


def index_dtype(max_value: int) -> np.dtype:
    """The smallest of uint16 / int32 holding 0..max_value."""
    return np.dtype(np.uint16) if max_value <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def document_position_ids(input_ids_NT: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Each token's offset from the last document start (window start or the token after an EOS)."""
    N, T = input_ids_NT.shape
    t_T = np.arange(T)
    is_start_NT = np.empty((N, T), dtype=bool)
    is_start_NT[:, 0] = True
    is_start_NT[:, 1:] = input_ids_NT[:, :-1] == eos_token_id
    last_start_NT = np.maximum.accumulate(np.where(is_start_NT, t_T, 0), axis=1)
    return (t_T - last_start_NT).astype(index_dtype(T - 1))
