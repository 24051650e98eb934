"""bf16 on CPUs without bf16 matrix units: matmuls computed in fp32, rounded back to bf16.

There oneDNN emulates bf16 GEMMs at a small fraction of the fp32 speed, while the upcast is one pass over the
inputs; the result is a bf16 GEMM with fp32 accumulation, as on a GPU. The bf16 training rows of
`bench/bench_vs_transformers.py` measure both ways on the CPU they run on.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

_X86 = ("x86_64", "amd64", "i386", "i686")


@functools.cache
def has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively: on x86, AVX512-BF16 or AMX, as torch reports them; CPUs of other
    architectures are trusted to (their bf16 GEMMs go through oneDNN's native paths)."""
    if platform.machine().lower() not in _X86:
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class _UpcastLinear(torch.autograd.Function):
    """`x @ w^T` for bf16 tensors computed in fp32; saves the bf16 inputs (no fp32 copies kept for backward)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy32 = dy.float()
        dx = dy32 @ w.float() if ctx.needs_input_grad[0] else None
        dw = dy32.flatten(0, -2).t() @ x.float().flatten(0, -2) if ctx.needs_input_grad[1] else None
        return (None if dx is None else dx.to(x.dtype)), (None if dw is None else dw.to(w.dtype))


def upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` (no bias) for bf16 `x` and `w`, computed in fp32 and rounded back to bf16."""
    return _UpcastLinear.apply(x, w)
