"""The `fused` operations: `ReferenceOps` with its methods swapped for the kernels of `jetmoe.kernels`, and the rule
that picks the operations of a forward (`select_ops`).

`config.kernels` chooses between the two families; within `fused`, the device and the dtype choose:

    kernels     device   dtype                            operations
    reference   any      any                              ReferenceOps   plain PyTorch, the definitions
    fused       not CPU  any                              FusedOps       custom backwards, grouped GEMM, fused CE
    fused       CPU      fp32                             CpuOps         + the few-row products of decoding
    fused       CPU      bf16, CPU with bf16 units        CpuBf16Ops     + blocked bf16 causal attention
    fused       CPU      bf16, CPU without bf16 units     CpuUpcastOps   + bf16 matmuls computed in fp32

Whether a CPU has bf16 units is torch's answer (`kernels.cpu.bf16.has_bf16_units`). Every override is tested
against the reference method it replaces, forward and gradients (tests/model/test_backends.py); the gains are
measured by bench/bench_vs_transformers.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetmoe.config import EXPERT_IMPLS
from jetmoe.kernels import fused
from jetmoe.kernels.cpu.attention import causal_attention
from jetmoe.kernels.cpu.bf16 import has_bf16_units, upcast_linear
from jetmoe.kernels.cpu.decode import FEW_ROWS, few_row_linear
from jetmoe.kernels.cross_entropy import linear_cross_entropy
from jetmoe.kernels.grouped_mm import grouped_mm, grouped_mm_supported, rows_aligned
from jetmoe.model.ops import ReferenceOps
from jetmoe.model.routing import Routing

class FusedOps(ReferenceOps):
    """Hand-written backwards (no scatter-add, fewer passes and allocations) and all experts in one sync-free
    grouped GEMM; the LM head fused with a chunked fp32 cross-entropy."""

    name = "fused"

    def __init__(self, expert_impl: str = "auto") -> None:
        self.expert_impl = expert_impl

    def rms_norm(self, x, weight, eps):
        return fused.rms_norm(x, weight, eps)

    def rotary(self, x, cos, sin):
        return fused.rotary(x, cos, sin)

    def glu(self, h_M2F, activation):
        return fused.silu_glu(h_M2F) if activation is F.silu else super().glu(h_M2F, activation)

    def dispatch(self, x_ND, routing):
        return fused.dispatch_tokens(x_ND, routing.token_M, routing.rank_Nk)

    def combine(self, y_MD, routing, bias_D):
        return fused.mix(y_MD, routing.gates_Nk, bias_D, routing.rank_Nk, routing.token_M, routing.slot_M)

    def to_heads(self, q_MA, routing, num_heads):
        to_heads, to_experts = _head_order(routing, num_heads)
        Dh = q_MA.shape[-1] // num_heads
        return fused.gather_rows(q_MA.reshape(-1, Dh), to_heads, to_experts).view(-1, num_heads * routing.top_k, Dh)

    def from_heads(self, o_NQD, routing, num_heads):
        to_heads, to_experts = _head_order(routing, num_heads)
        Dh = o_NQD.shape[-1]
        return fused.gather_rows(o_NQD.reshape(-1, Dh), to_experts, to_heads).view(-1, num_heads * Dh)

    def expert_linear(self, x_MI, w_EOI, routing):
        if self.grouped(x_MI, w_EOI):
            return grouped_mm(x_MI, w_EOI, routing.offsets_E)
        return super().expert_linear(x_MI, w_EOI, routing)

    def grouped(self, x_MI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
        """`expert_impl`: `grouped` always, `loop` never, `auto` where torch runs the grouped GEMM for this device
        and dtype and the weight's rows meet its 16-byte alignment."""
        if self.expert_impl != "auto":
            return self.expert_impl == "grouped"
        return grouped_mm_supported(x_MI.device.type, x_MI.dtype) and rows_aligned(x_MI.dtype, *w_EOI.shape[1:])

    def lm_head_loss(self, h_BTD, w_VD, labels_BT):
        return linear_cross_entropy(h_BTD, w_VD, labels_BT)


class CpuOps(FusedOps):
    """On the CPU, products of at most `FEW_ROWS` rows (decode steps) in the form MKL streams a weight fastest, and
    an expert layer of at most `LOOP_ROWS` routed rows as one such product per expert, with the row counts read on
    the host: on the CPU that is no device synchronisation, and the grouped GEMM of so few rows costs more. A
    compiled decode step of one sequence multiplies each routed row by its own expert's weight
    (`_few_row_products`); the decode rows of bench/bench_vs_transformers.py measure both modes."""

    LOOP_ROWS = 2 * FEW_ROWS
    ROW_PRODUCT_ROWS = 4  # compiled: at most this many routed rows (one sequence, top-2 to 4) take a product each

    def linear(self, x, w_OI):
        if x.dtype == torch.float32 and x.shape[:-1].numel() <= FEW_ROWS:
            return few_row_linear(x, w_OI)
        return F.linear(x, w_OI)

    def expert_linear(self, x_MI, w_EOI, routing):
        if x_MI.shape[0] > self.LOOP_ROWS:
            return super().expert_linear(x_MI, w_EOI, routing)
        return self._few_row_products(x_MI, w_EOI, routing, x_MI.shape[0])

    def expert_mlp(self, x_MD, w_E2FD, w_EDF, activation, routing):
        """Both products chosen by the rows coming in: in a compiled graph the first product's rows can be a sum of
        unbacked counts, which the second could not compare with a row limit."""
        rows = x_MD.shape[0]
        if rows > self.LOOP_ROWS:
            return super().expert_mlp(x_MD, w_E2FD, w_EDF, activation, routing)
        h_M2F = self._few_row_products(x_MD, w_E2FD, routing, rows)
        return self._few_row_products(self.glu(h_M2F, activation), w_EDF, routing, rows)

    def _few_row_products(self, x_MI, w_EOI, routing, rows: int):
        """The products of at most `LOOP_ROWS` sorted rows (`rows`: their count as the caller knows it). Eager: one
        product per expert that has rows, the counts read on the host. Compiled: at most `ROW_PRODUCT_ROWS` rows
        take a product each with a view of their expert's weight (the expert read as a host scalar: no empty
        products); more take every expert's slice, sized by unbacked counts, without the few-row padding."""
        if not torch.compiler.is_compiling():
            ends = routing.offsets_E.tolist()
            starts = [0, *ends[:-1]]
            return torch.cat([self.linear(x_MI[start:end], w_EOI[e])
                              for e, (start, end) in enumerate(zip(starts, ends)) if end > start])
        if rows <= self.ROW_PRODUCT_ROWS:
            experts_M = routing.experts_Nk.flatten()[routing.slot_M]
            products = []
            for m in range(rows):
                e = experts_M[m].item()
                torch._check(e >= 0)
                torch._check(e < w_EOI.shape[0])
                products.append(self.linear(x_MI[m:m + 1], w_EOI[e]))
            return torch.cat(products)
        chunks = x_MI.split(routing.counts_E.tolist())
        return torch.cat([torch.mm(w_EOI[e], chunk_I.t()).t() for e, chunk_I in enumerate(chunks)])


class CpuBf16Ops(CpuOps):
    """bf16 on a CPU with bf16 units: causal self-attention (as many keys as queries, no mask, no dropout) by
    blocked bf16 GEMMs, forward and backward (`kernels.cpu.attention`)."""

    def attention(self, q_BQTD, k_BHSD, v_BHSD, mask, dropout):
        if mask is None and dropout == 0.0 and q_BQTD.shape[2] == k_BHSD.shape[2] > 1:
            return causal_attention(q_BQTD, k_BHSD, v_BHSD)
        return super().attention(q_BQTD, k_BHSD, v_BHSD, mask, dropout)


class CpuUpcastOps(CpuOps):
    """bf16 on a CPU without bf16 units, where oneDNN emulates bf16 GEMMs slowly: matmuls and attention computed in
    fp32 from the bf16 inputs, results rounded back to bf16 (`kernels.cpu.bf16`)."""

    UPCAST_MIN_ROWS = 256  # fewer routed rows: converting every expert weight to fp32 costs more than it saves

    def linear(self, x, w_OI):
        return upcast_linear(x, w_OI)

    def expert_linear(self, x_MI, w_EOI, routing):
        if x_MI.shape[0] >= self.UPCAST_MIN_ROWS and self.grouped(x_MI, w_EOI):
            return grouped_mm(x_MI, w_EOI, routing.offsets_E, upcast=True)
        return super().expert_linear(x_MI, w_EOI, routing)

    def attention(self, q_BQTD, k_BHSD, v_BHSD, mask, dropout):
        return super().attention(q_BQTD.float(), k_BHSD.float(), v_BHSD.float(), mask, dropout).to(q_BQTD.dtype)

    def lm_head_loss(self, h_BTD, w_VD, labels_BT):
        return linear_cross_entropy(h_BTD, w_VD, labels_BT, compute_dtype=torch.float32)


def _head_order(routing: Routing, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pair moving MoA query rows between expert order (`[M·H, Dh]`: sorted row, head) and attention order
    (`[N·H·k, Dh]`: token, head h, slot j)."""
    H, k = num_heads, routing.top_k
    heads_H = torch.arange(H, device=routing.slot_M.device)
    # Attention position (n, h, j) holds sorted row rank[n·k + j], head h.
    to_heads_NHk = routing.rank_M.view(-1, 1, k) * H + heads_H.view(1, H, 1)
    # Sorted row i (slot s = n·k + j), head h sits at attention position (n·H + h)·k + j.
    slot_M = routing.slot_M
    to_experts_MH = (slot_M - slot_M % k).view(-1, 1) * H + heads_H.view(1, H) * k + (slot_M % k).view(-1, 1)
    return to_heads_NHk.flatten(), to_experts_MH.flatten()


_REFERENCE = ReferenceOps()
_CPU = {torch.float32: CpuOps, torch.bfloat16: CpuBf16Ops if has_bf16_units() else CpuUpcastOps}
_FUSED = {  # built once: a forward only looks its operations up (nothing for torch.compile to trace)
    impl: {"cpu": {dtype: cls(impl) for dtype, cls in _CPU.items()} | {None: CpuOps(impl)}, None: FusedOps(impl)}
    for impl in EXPERT_IMPLS
}


def select_ops(kernels: str, expert_impl: str, device: torch.device, dtype: torch.dtype) -> ReferenceOps:
    """The operations of a forward whose activations have `device` and `dtype` (see the module docstring)."""
    if kernels == "reference":
        return _REFERENCE
    by_device = _FUSED[expert_impl]
    if device.type != "cpu":
        return by_device[None]
    return by_device["cpu"].get(dtype, by_device["cpu"][None])
