"""The few-row product form of decoding on the CPU.

A decode step multiplies each weight by a few rows (one per sequence, or an expert's share of them). For such
products MKL streams a weight from memory much faster as `(w @ x^T)^T` than as `x @ w^T`, and faster for 2 and 4
rows than for 1 and 3; the decode rows of `bench/bench_vs_transformers.py` time the chain of a decode step's
products in both forms on the CPU they run on (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEW_ROWS = 16  # at most this many rows take the few-row form


def few_rows_padded(rows):
    """How many rows `few_row_linear` multiplies for `rows` rows (an int, a SymInt or an integer tensor): an odd
    count below 4 takes one more, a zero row whose output is dropped."""
    return rows + ((rows % 2 == 1) & (rows < 4))


def few_row_linear(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w_OI)` (no bias) for at most `FEW_ROWS` rows of `x` (any leading shape), as `(w @ x^T)^T` on
    `few_rows_padded` rows."""
    rows = x.shape[:-1].numel()
    x_MI = x.reshape(rows, x.shape[-1])
    spare = few_rows_padded(rows) - rows
    y_MO = torch.mm(w_OI, (F.pad(x_MI, (0, 0, 0, spare)) if spare else x_MI).t()).t()
    return (y_MO[:rows] if spare else y_MO).reshape(*x.shape[:-1], w_OI.shape[0])
