"""The few-row product form of decoding on the CPU.

A decode step multiplies each weight by a few rows (one per sequence, or an expert's share of them). For such
products MKL streams a weight from memory much faster as `(w @ x^T)^T` than as `x @ w^T`, and faster for 2 and 4
rows than for 1 and 3; the decode rows of `bench/bench_vs_transformers.py` time the chain of a decode step's
products in both forms on the CPU they run on (bench/RESULTS.md).
"""

from __future__ import annotations

import torch

FEW_ROWS = 16  # at most this many rows take the few-row form


def few_rows_padded(rows: int) -> int:
    """How many rows `few_row_linear` multiplies for `rows` rows: an odd count below 4 takes one more (a copy of the
    first row, whose output is dropped)."""
    return rows + (rows % 2 == 1 and rows < 4)


def few_row_linear(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w_OI)` (no bias) for at most `FEW_ROWS` rows of `x` (any leading shape), as `(w @ x^T)^T` on
    `few_rows_padded` rows."""
    rows = x.shape[:-1].numel()
    x_MI = x.reshape(rows, x.shape[-1])
    if few_rows_padded(rows) > rows:
        x_MI = torch.cat([x_MI, x_MI[:1]])
    y_MO = torch.mm(w_OI, x_MI.t()).t()
    return y_MO[:rows].view(*x.shape[:-1], w_OI.shape[0])
