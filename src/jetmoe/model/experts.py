"""Top-k routers and the two expert layers of JetMoE: Mixture of MLP experts (MoE) and Mixture of Attention
heads (MoA, its query/output projections; the attention itself is in attention.py).

Dispatch is sync-free: the N·k (token, slot) rows are sorted by expert and every expert's slice is multiplied
in one grouped GEMM (`torch._grouped_mm`). The reference `loop` implementation runs one GEMM per expert,
like transformers does; both are tested against each other.

Shape letters: N tokens, k experts per token, M = N·k routed rows, E experts, D model width,
I/O an expert's input/output width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jetmoe.config import JetMoeConfig

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


@torch._dynamo.assume_constant_result  # a Python constant while tracing: no graph break
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs (forward and backward) for this device type and dtype; probed once."""
    key = (device_type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        try:
            x = torch.randn(32, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
            y = torch._grouped_mm(x, w, offs=offsets)
            y.backward(torch.ones_like(y))
            _GROUPED_MM_SUPPORT[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM_SUPPORT[key] = False
    return _GROUPED_MM_SUPPORT[key]


def resolve_expert_impl(impl: str, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> str:
    """`auto` picks the grouped GEMM where the device runs it for this dtype and every matrix row is a multiple
    of 16 bytes (its alignment rule), else the loop reference."""
    if impl == "auto":
        aligned = all(width * dtype.itemsize % 16 == 0 for width in widths)
        return "grouped" if aligned and grouped_mm_supported(device.type, dtype) else "loop"
    return impl


@torch.library.custom_op("jetmoe::grouped_mm", mutates_args=())
def grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x_MI` times `w_EIO[e]`: `torch._grouped_mm` as an opaque op, so it
    compiles for every dtype the device runs (its built-in fake kernel only admits bf16)."""
    return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E)


@torch.library.custom_op("jetmoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_MI: torch.Tensor, dy_MO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert `x_e^T @ dy_e`: the `[E, I, O]` weight gradient of `grouped_mm`."""
    return torch._grouped_mm(x_MI.t(), dy_MO, offs=offsets_E)


@grouped_mm.register_fake
def _(x_MI, w_EIO, offsets_E):
    return x_MI.new_empty(x_MI.shape[0], w_EIO.shape[-1])


@grouped_mm_weight_grad.register_fake
def _(x_MI, dy_MO, offsets_E):
    return x_MI.new_empty(offsets_E.shape[0], x_MI.shape[1], dy_MO.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy_MO):
    x_MI, w_EIO, offsets_E = ctx.saved_tensors
    dy_MO = dy_MO.contiguous()
    dx_MI = grouped_mm(dy_MO, w_EIO.transpose(-2, -1), offsets_E)
    dw_EIO = grouped_mm_weight_grad(x_MI, dy_MO, offsets_E)
    return dx_MI, dw_EIO, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def expert_linear(
    x_MI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor, impl: str
) -> torch.Tensor:
    """Rows of `x_MI` sorted by expert (expert e owns `counts_E[e]` consecutive rows) times `w_EOI[e]^T`."""
    if impl == "grouped":
        return grouped_mm(x_MI, w_EOI.transpose(-2, -1), offsets_E)
    # Reference: one matmul per expert; `.tolist()` syncs with the host (not compilable, like transformers).
    chunks = x_MI.split(counts_E.tolist())
    return torch.cat([F.linear(chunk_I, w_EOI[e]) for e, chunk_I in enumerate(chunks)])


@dataclass
class Routing:
    """Top-k routing of N tokens, with the N·k routed rows sorted by expert."""

    logits_NE: torch.Tensor  # fp32 router logits
    gates_M: torch.Tensor  # gate of each sorted row (softmax over the token's top-k logits)
    slot_M: torch.Tensor  # flat (token * k + slot) index of each sorted row
    token_M: torch.Tensor  # token index of each sorted row
    counts_E: torch.Tensor  # rows per expert
    offsets_E: torch.Tensor  # int32 cumulative counts (end of each expert's rows)


class TopKRouter(nn.Module):
    """Linear router in fp32; softmax over the top-k logits gives the gates."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)  # HF key: router.layer.weight

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.layer.weight.float())
        topk_logits_Nk, experts_Nk = logits_NE.topk(self.top_k, dim=-1)
        gates_Nk = topk_logits_Nk.softmax(dim=-1).to(x_ND.dtype)
        experts_M = experts_Nk.flatten()
        slot_M = experts_M.argsort(stable=True)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E = counts_E.scatter_add_(0, experts_M, torch.ones_like(experts_M))
        return Routing(
            logits_NE=logits_NE,
            gates_M=gates_Nk.flatten()[slot_M],
            slot_M=slot_M,
            token_M=torch.div(slot_M, self.top_k, rounding_mode="floor"),
            counts_E=counts_E,
            offsets_E=counts_E.cumsum(0).to(torch.int32),
        )


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
        impl = resolve_expert_impl(impl, x_MI.device, x_MI.dtype, tuple(self.weight.shape[1:]))
        return expert_linear(x_MI, self.weight, routing.counts_E, routing.offsets_E, impl)


def combine(y_MD: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of each token's k expert outputs: `[M, D]` sorted rows -> `[N, D]`."""
    y_MD = y_MD * routing.gates_M[:, None]
    return torch.zeros(num_tokens, y_MD.shape[-1], dtype=y_MD.dtype, device=y_MD.device).index_add(
        0, routing.token_M, y_MD
    )


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
        routing = self.router(x_ND)
        h_M2F = self.input_linear(x_ND[routing.token_M], routing, self.expert_impl)
        gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
        y_MD = self.output_linear(self.activation(gate_MF) * up_MF, routing, self.expert_impl)
        out_ND = combine(y_MD, routing, B * T) + self.bias
        return out_ND.view(B, T, D), routing.logits_NE


class MixtureOfAttentionHeads(nn.Module):
    """Per-expert query and output projections of MoA (HF: JetMoeMoA).

    `map` turns each token into k query groups (one per selected expert); `reduce` projects the k attention
    outputs back with the same experts and mixes them with the gates.
    """

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        D, E = config.hidden_size, config.num_local_experts
        A = config.num_key_value_heads * config.kv_channels  # width of one expert's heads
        std = config.initializer_range
        self.top_k, self.expert_impl = config.num_experts_per_tok, config.expert_impl
        self.input_linear = ParallelExperts(E, D, A, std)  # [E, A, D]: queries
        self.output_linear = ParallelExperts(E, A, D, std)  # [E, D, A]: outputs
        self.bias = nn.Parameter(torch.empty(D))
        self.router = TopKRouter(D, E, self.top_k)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def map(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        routing = self.router(x_ND)
        q_MA = self.input_linear(x_ND[routing.token_M], routing, self.expert_impl)
        # Unsort: row (token, slot) goes back to position token * k + slot.
        q_MA = torch.zeros_like(q_MA).index_copy(0, routing.slot_M, q_MA)
        return q_MA.view(B, T, self.top_k, -1), routing

    def reduce(self, o_BTkA: torch.Tensor, routing: Routing) -> torch.Tensor:
        B, T, k, A = o_BTkA.shape
        o_MA = o_BTkA.reshape(-1, A)[routing.slot_M]
        y_MD = self.output_linear(o_MA, routing, self.expert_impl)
        return (combine(y_MD, routing, B * T) + self.bias).view(B, T, -1)
