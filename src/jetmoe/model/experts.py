"""Top-k routers and the two expert layers of JetMoE: Mixture of MLP experts (MoE) and Mixture of Attention
heads (MoA, its query/output projections; the attention itself is in attention.py).

Dispatch is sync-free: the N·k (token, slot) rows are sorted by expert and every expert's slice is multiplied
in one grouped GEMM (`torch._grouped_mm`). Moving rows between token order and expert order only uses
permutation gathers whose backward is a gather too (`ops.gather_rows`, `ops.dispatch_tokens`), and the k
expert outputs of a token are mixed by a batched [1 x k] @ [k x D] product with the gates. The reference `loop`
implementation runs one GEMM per expert and the index_add / index_copy formulation of transformers; both are
tested against each other.

Shape letters: N tokens, k experts per token, M = N·k routed rows, E experts, D model width,
I/O an expert's input/output width, H key/value heads, Dh head dim, A = H·Dh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from jetmoe.config import JetMoeConfig
from jetmoe.model.ops import (
    argmax_top_k, dispatch_tokens, few_rows_form_faster, few_rows_linear, few_rows_padded, gather_rows, glu,
    grouped_mm, grouped_mm_supported, linear, mix,
)

__all__ = [
    "ACT_FNS", "MixtureOfAttentionHeads", "MixtureOfExperts", "ParallelExperts", "Routing", "TopKRouter",
    "combine", "expert_linear", "gathered_products", "grouped_mm", "grouped_mm_supported", "resolve_expert_impl",
]

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# On the CPU, at most this many routed rows (decoding up to 16 sequences at top-2, short prompts) take the loop,
# compiled or in fp32 inference. Compiled, its few BLAS calls, with row counts read as host scalars, cost less
# than the grouped GEMM, which the compiled C++ graph calls back into Python for (`ops.grouped_mm` is a Python
# custom op). In fp32 it multiplies each expert's few rows in the form this CPU's BLAS streams fastest.
LOOP_ROWS = 32
LOOP_EXPERT_ROWS = 2  # an expert's typical share of those rows (top-2 of 8 experts, decoding up to 8 sequences)


def resolve_expert_impl(
    impl: str, device: torch.device, dtype: torch.dtype, weight_shapes: tuple[tuple[int, int], ...] = (),
    rows: int | None = None,
) -> str:
    """`auto` picks the grouped GEMM where the device runs it for this dtype and every matrix row of the experts'
    `[out, in]` weights is a multiple of 16 bytes (its alignment rule), else the loop reference; and the loop for a
    CPU batch of at most `LOOP_ROWS` routed rows, compiled, or in fp32 inference where the few-row form is faster
    on this CPU for one of those weights."""
    if impl == "auto":
        if device.type == "cpu" and rows is not None and rows <= LOOP_ROWS:
            fp32_inference = dtype == torch.float32 and not torch.is_grad_enabled()
            if torch.compiler.is_compiling() or (
                fp32_inference and any(few_rows_form_faster(LOOP_EXPERT_ROWS, *shape) for shape in weight_shapes)
            ):
                return "loop"
        aligned = all(width * dtype.itemsize % 16 == 0 for shape in weight_shapes for width in shape)
        return "grouped" if aligned and grouped_mm_supported(device.type, dtype) else "loop"
    return impl


def expert_linear(
    x_MI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor, impl: str
) -> torch.Tensor:
    """Rows of `x_MI` sorted by expert (expert e owns `counts_E[e]` consecutive rows) times `w_EOI[e]^T`."""
    if impl == "grouped":
        return grouped_mm(x_MI, w_EOI.transpose(-2, -1), offsets_E)
    # Reference: one matmul per expert; `.tolist()` syncs with the host (not compilable, like transformers).
    # A few rows in fp32 on the CPU (decoding) take `few_rows_linear` where this CPU's BLAS runs it faster for an
    # expert's typical share of them. Compiled, a row count summed from host-read counts is unknown while tracing:
    # taken as few, since compiled graphs take the loop for small batches only (`resolve_expert_impl`).
    few = x_MI.device.type == "cpu" and x_MI.dtype == torch.float32 and guard_or_true(
        x_MI.shape[0] <= LOOP_ROWS
    ) and few_rows_form_faster(LOOP_EXPERT_ROWS, *w_EOI.shape[1:])
    if not few:
        return torch.cat([F.linear(chunk_I, w_EOI[e]) for e, chunk_I in enumerate(x_MI.split(counts_E.tolist()))])
    # The few-row form on `few_rows_padded(count)` rows for each expert: the rows move to a layout of M + E rows
    # where expert e owns `padded_E[e]` (spare rows zero, the last chunk the spare rows left over), and back.
    M, E = x_MI.shape[0], w_EOI.shape[0]
    padded_E = few_rows_padded(counts_E)
    spare_E = padded_E - counts_E
    rows_M = torch.arange(M, device=x_MI.device)
    to_padded_M = rows_M + (spare_E.cumsum(0) - spare_E)[torch.bucketize(rows_M, offsets_E, right=True)]
    sizes = torch.cat([padded_E, M + E - padded_E.sum(0, keepdim=True)]).tolist()  # host scalars, as above
    chunks = x_MI.new_zeros(M + E, x_MI.shape[1]).index_copy(0, to_padded_M, x_MI).split(sizes)
    y_PO = torch.cat([few_rows_linear(chunks[e], w_EOI[e]) for e in range(E)]
                     + [x_MI.new_zeros(sizes[E], w_EOI.shape[1])])
    return y_PO[to_padded_M]


# Compiled decoding of at most this many routed rows (tokens · k) skips the sort and the grouped GEMM: each row
# is multiplied by its expert's weight read in place (see `ParallelExperts.per_slot`).
SMALL_BATCH_ROWS = 4


def small_batch(num_tokens: int, top_k: int) -> bool:
    return torch.compiler.is_compiling() and num_tokens * top_k <= SMALL_BATCH_ROWS


@dataclass
class Routing:
    """Top-k routing of N tokens, with the N·k routed rows sorted by expert.

    Slot `n·k + j` is token n's j-th choice; `slot_M` and `rank_M` are inverse permutations between slots and
    sorted rows. The sorted fields are None when the router was asked not to sort (small-batch decoding)."""

    logits_NE: torch.Tensor  # fp32 router logits
    experts_Nk: torch.Tensor  # chosen experts, in slot order
    gates_Nk: torch.Tensor  # softmax over each token's top-k logits, in slot order
    slot_M: torch.Tensor | None = None  # slot of each sorted row
    rank_M: torch.Tensor | None = None  # sorted row of each slot
    counts_E: torch.Tensor | None = None  # rows per expert
    offsets_E: torch.Tensor | None = None  # int32 cumulative counts (end of each expert's rows)

    @property
    def top_k(self) -> int:
        return self.gates_Nk.shape[-1]

    @property
    def rank_Nk(self) -> torch.Tensor:
        return self.rank_M.view(-1, self.top_k)

    @property
    def token_M(self) -> torch.Tensor:
        """Token of each sorted row."""
        return torch.div(self.slot_M, self.top_k, rounding_mode="floor")

    @property
    def gates_M(self) -> torch.Tensor:
        """Gate of each sorted row."""
        return self.gates_Nk.flatten()[self.slot_M]


class TopKRouter(nn.Module):
    """Linear router in fp32; softmax over the top-k logits gives the gates."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)  # HF key: router.layer.weight

    def forward(self, x_ND: torch.Tensor, sort: bool = True) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.layer.weight.float())
        if torch.compiler.is_compiling() and x_ND.device.type == "cpu" and not torch.is_grad_enabled():
            topk_logits_Nk, experts_Nk = argmax_top_k(logits_NE, self.top_k)  # compiled CPU inference: fused
        else:
            topk_logits_Nk, experts_Nk = logits_NE.topk(self.top_k, dim=-1)
        gates_Nk = topk_logits_Nk.softmax(dim=-1).to(x_ND.dtype)
        if not sort:
            return Routing(logits_NE=logits_NE, experts_Nk=experts_Nk, gates_Nk=gates_Nk)
        experts_M = experts_Nk.flatten()
        slot_M = experts_M.argsort(stable=True)
        rows_M = torch.arange(slot_M.shape[0], device=slot_M.device)
        rank_M = torch.empty_like(slot_M).scatter_(0, slot_M, rows_M)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E = counts_E.scatter_add_(0, experts_M, torch.ones_like(experts_M))
        return Routing(
            logits_NE=logits_NE, experts_Nk=experts_Nk, gates_Nk=gates_Nk, slot_M=slot_M, rank_M=rank_M,
            counts_E=counts_E, offsets_E=counts_E.cumsum(0).to(torch.int32),
        )


def gathered_products(w_EOI: torch.Tensor, x_NkI: torch.Tensor, experts_Nk: torch.Tensor) -> torch.Tensor:
    """`y[n, j] = W[experts[n, j]] @ x[n, j]` as a gathered multiply-sum: compiled, one fused kernel that reads
    each chosen expert's weight in place."""
    return (w_EOI[experts_Nk] * x_NkI.unsqueeze(-2)).sum(-1)


class ParallelExperts(nn.Module):
    """E linear maps stored as one `[E, out, in]` weight (the HF / ScatterMoE layout)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, x_MI: torch.Tensor, routing: Routing, impl: str) -> torch.Tensor:
        return expert_linear(x_MI, self.weight, routing.counts_E, routing.offsets_E, impl)

    def per_slot(self, x_NkI: torch.Tensor, experts_Nk: torch.Tensor) -> torch.Tensor:
        """`y[n, j] = W[experts[n, j]] @ x[n, j]` (x may broadcast over j), reading each chosen expert's weight in
        place (no sort, no copy). On the CPU: one BLAS matrix-vector product per slot on a view of the weight,
        each expert id read as a host scalar (a fused gathered multiply-sum ran ~25 % slower there). Elsewhere,
        where reading a scalar would stall the device: that gathered multiply-sum, one fused kernel."""
        if x_NkI.device.type != "cpu":
            return gathered_products(self.weight, x_NkI, experts_Nk)
        N, k = experts_Nk.shape
        x_NkI = x_NkI.expand(N, k, -1)
        rows = []
        for n in range(N):
            for j in range(k):
                e = experts_Nk[n, j].item()
                torch._check(e >= 0)
                torch._check(e < self.weight.shape[0])
                rows.append(linear(x_NkI[n, j], self.weight[e]))
        return torch.stack(rows).view(N, k, -1)


def _module_impl(module: nn.Module, x: torch.Tensor, routing: Routing) -> str:
    """The expert implementation of an MoE / MoA layer: one choice for both of its expert weights."""
    shapes = (tuple(module.input_linear.weight.shape[1:]), tuple(module.output_linear.weight.shape[1:]))
    return resolve_expert_impl(module.expert_impl, x.device, x.dtype, shapes, routing.experts_Nk.numel())


def combine(y_MD: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Reference: gate-weighted sum of each token's k expert outputs, `[M, D]` sorted rows -> `[N, D]`."""
    y_MD = y_MD * routing.gates_M[:, None]
    return torch.zeros(num_tokens, y_MD.shape[-1], dtype=y_MD.dtype, device=y_MD.device).index_add(
        0, routing.token_M, y_MD
    )


def mix_experts(y_MD: torch.Tensor, routing: Routing, bias_D: torch.Tensor) -> torch.Tensor:
    """Fast `combine(...) + bias` (`ops.mix`): `[M, D]` sorted rows -> `[N, D]`."""
    return mix(y_MD, routing.gates_Nk, bias_D, routing.rank_Nk, routing.token_M, routing.slot_M)


class MixtureOfExperts(nn.Module):
    """Top-k mixture of GLU MLP experts with a shared output bias (HF: JetMoeMoE)."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        D, F_, E = config.hidden_size, config.intermediate_size, config.num_local_experts
        std = config.initializer_range
        self.expert_impl = config.expert_impl
        self.activation = ACT_FNS[config.activation_function]
        self.input_linear = ParallelExperts(E, D, 2 * F_, std)  # [E, 2F, D]: (gate | up)
        self.output_linear = ParallelExperts(E, F_, D, std)  # [E, D, F]
        self.bias = nn.Parameter(torch.empty(D))
        self.router = TopKRouter(D, E, config.num_experts_per_tok)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        if small_batch(B * T, self.router.top_k):
            routing = self.router(x_ND, sort=False)
            h_Nk2F = self.input_linear.per_slot(x_ND.unsqueeze(1), routing.experts_Nk)
            gate_NkF, up_NkF = h_Nk2F.chunk(2, dim=-1)
            y_NkD = self.output_linear.per_slot(self.activation(gate_NkF) * up_NkF, routing.experts_Nk)
            out_ND = (routing.gates_Nk.unsqueeze(1) @ y_NkD).squeeze(1) + self.bias
            return out_ND.view(B, T, D), routing.logits_NE
        routing = self.router(x_ND)
        impl = _module_impl(self, x_ND, routing)
        if impl == "loop":  # reference
            h_M2F = self.input_linear(x_ND[routing.token_M], routing, impl)
            gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
            y_MD = self.output_linear(self.activation(gate_MF) * up_MF, routing, impl)
            out_ND = combine(y_MD, routing, B * T) + self.bias
        else:
            h_M2F = self.input_linear(dispatch_tokens(x_ND, routing.token_M, routing.rank_Nk), routing, impl)
            y_MD = self.output_linear(glu(h_M2F, self.activation), routing, impl)
            out_ND = mix_experts(y_MD, routing, self.bias)
        return out_ND.view(B, T, D), routing.logits_NE


@dataclass
class HeadOrder:
    """Index pair moving query rows between expert order (`[M·H, Dh]`: sorted row, head) and attention order
    (`[N·H·k, Dh]`: token, head h, slot j), where query head h·k + j attends with key/value head h."""

    to_heads: torch.Tensor  # attention-order position -> expert-order row
    to_experts: torch.Tensor  # expert-order row -> attention-order position


class MixtureOfAttentionHeads(nn.Module):
    """Per-expert query and output projections of MoA (HF: JetMoeMoA).

    `map` turns each token into k query groups of H heads (one group per selected expert), laid out
    `[B, T, H·k, Dh]` with query head h·k + j = (head h, slot j); `reduce` projects the k attention outputs
    (same layout) back with the same experts and mixes them with the gates.
    """

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        D, E = config.hidden_size, config.num_local_experts
        self.num_heads, self.head_dim = config.num_key_value_heads, config.kv_channels
        A = self.num_heads * self.head_dim  # width of one expert's heads
        std = config.initializer_range
        self.top_k, self.expert_impl = config.num_experts_per_tok, config.expert_impl
        self.input_linear = ParallelExperts(E, D, A, std)  # [E, A, D]: queries
        self.output_linear = ParallelExperts(E, A, D, std)  # [E, D, A]: outputs
        self.bias = nn.Parameter(torch.empty(D))
        self.router = TopKRouter(D, E, self.top_k)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def _head_order(self, routing: Routing) -> HeadOrder:
        H, k = self.num_heads, self.top_k
        heads_H = torch.arange(H, device=routing.rank_M.device)
        # Attention position (n, h, j) holds row rank[n·k + j], head h.
        to_heads_NHk = routing.rank_M.view(-1, 1, k) * H + heads_H.view(1, H, 1)
        # Sorted row i (slot s = n·k + j), head h sits at attention position (n·H + h)·k + j.
        slot_M = routing.slot_M
        to_experts_MH = (slot_M - slot_M % k).view(-1, 1) * H + heads_H.view(1, H) * k + (slot_M % k).view(-1, 1)
        return HeadOrder(to_heads_NHk.flatten(), to_experts_MH.flatten())

    def map(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, tuple[Routing, HeadOrder | None]]:
        """Queries `[B, T, H·k, Dh]` and the routing state `reduce` needs."""
        B, T, D = x_BTD.shape
        H, k, Dh = self.num_heads, self.top_k, self.head_dim
        x_ND = x_BTD.reshape(-1, D)
        if small_batch(B * T, k):
            routing = self.router(x_ND, sort=False)
            q_NkA = self.input_linear.per_slot(x_ND.unsqueeze(1), routing.experts_Nk)
            q_BTQD = q_NkA.view(B, T, k, H, Dh).transpose(2, 3).reshape(B, T, H * k, Dh)
            return q_BTQD, (routing, None)
        routing = self.router(x_ND)
        impl = _module_impl(self, x_ND, routing)
        if impl == "loop":  # reference: unsort to (token, slot) order, then put slots inside heads
            q_MA = self.input_linear(x_ND[routing.token_M], routing, impl)
            q_MA = torch.zeros_like(q_MA).index_copy(0, routing.slot_M, q_MA)
            q_BTQD = q_MA.view(B, T, k, H, Dh).transpose(2, 3).reshape(B, T, H * k, Dh)
            return q_BTQD, (routing, None)
        order = self._head_order(routing)
        q_MA = self.input_linear(dispatch_tokens(x_ND, routing.token_M, routing.rank_Nk), routing, impl)
        q_BTQD = gather_rows(q_MA.view(-1, Dh), order.to_heads, order.to_experts).view(B, T, H * k, Dh)
        return q_BTQD, (routing, order)

    def reduce(self, o_BTQD: torch.Tensor, state: tuple[Routing, HeadOrder | None]) -> torch.Tensor:
        """Attention outputs `[B, T, H·k, Dh]` -> `[B, T, D]`."""
        routing, order = state
        B, T, Q, Dh = o_BTQD.shape
        A = self.num_heads * Dh
        if routing.slot_M is None:  # small batch (see `map`)
            o_NkA = o_BTQD.reshape(B * T, self.num_heads, self.top_k, Dh).transpose(1, 2).reshape(B * T, -1, A)
            y_NkD = self.output_linear.per_slot(o_NkA, routing.experts_Nk)
            return ((routing.gates_Nk.unsqueeze(1) @ y_NkD).squeeze(1) + self.bias).view(B, T, -1)
        impl = _module_impl(self, o_BTQD, routing)
        if impl == "loop":  # reference
            o_MA = o_BTQD.reshape(B, T, self.num_heads, self.top_k, Dh).transpose(2, 3).reshape(-1, A)[routing.slot_M]
            y_MD = self.output_linear(o_MA, routing, impl)
            return (combine(y_MD, routing, B * T) + self.bias).view(B, T, -1)
        o_MA = gather_rows(o_BTQD.reshape(-1, Dh), order.to_experts, order.to_heads).view(-1, A)
        y_MD = self.output_linear(o_MA, routing, impl)
        return mix_experts(y_MD, routing, self.bias).view(B, T, -1)
