"""Device-agnostic fused ops, each with a hand-written backward where autograd's default costs extra passes over
memory or extra allocations: row permutations and token dispatch (gathers whose backward is a gather too, never
an accumulating scatter), the gated mix of the k expert outputs, SiLU-GLU, rotary embeddings and RMSNorm.

Shape letters: N tokens, k experts per token, M = N·k routed rows, D model width, F expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _NoAutograd:
    """The `ctx` of a forward run outside autograd: nothing is saved."""

    @staticmethod
    def save_for_backward(*tensors: torch.Tensor) -> None:
        pass


def _run(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)`, or with grad mode off its forward alone: no backward can be asked for then, and
    `apply`'s bookkeeping is a visible share of an eager decode step (the decode rows of
    bench/bench_vs_transformers.py)."""
    if torch.is_grad_enabled():
        return function.apply(*args)
    return function.forward(_NoAutograd, *args)


# ----------------------------------------------------------------------------- row permutations


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        return dy.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a permutation `index` of the rows; `inverse` is its inverse permutation, so the backward is
    a gather too (no accumulating scatter)."""
    return _run(_GatherRows, x, index, inverse)


class _DispatchTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, token_M, rank_Nk):
        ctx.save_for_backward(rank_Nk)
        return x_ND.index_select(0, token_M)

    @staticmethod
    def backward(ctx, dy_MD):
        (rank_Nk,) = ctx.saved_tensors
        return F.embedding_bag(rank_Nk, dy_MD, mode="sum"), None, None


def dispatch_tokens(x_ND: torch.Tensor, token_M: torch.Tensor, rank_Nk: torch.Tensor) -> torch.Tensor:
    """`x_ND[token_M]`: every token copied to its k routed rows. `rank_Nk[n, j]` is the row of token n's j-th copy,
    so the backward sums each token's k gradient rows in one gather-and-sum pass (`embedding_bag`), with no
    scatter-add."""
    return _run(_DispatchTokens, x_ND, token_M, rank_Nk)


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, gates_Nk, bias_D, rank_Nk, token_M, slot_M):
        ctx.save_for_backward(y_MD, gates_Nk, rank_Nk, token_M, slot_M)
        out_ND = F.embedding_bag(rank_Nk, y_MD, per_sample_weights=gates_Nk, mode="sum")
        return out_ND.add_(bias_D)

    @staticmethod
    def backward(ctx, dout_ND):
        y_MD, gates_Nk, rank_Nk, token_M, slot_M = ctx.saved_tensors
        dout_MD = dout_ND.index_select(0, token_M)  # each row's token gradient
        dgates_Nk = None
        if ctx.needs_input_grad[1]:
            dgate_M = torch.linalg.vecdot(y_MD, dout_MD)
            dgates_Nk = dgate_M.index_select(0, rank_Nk.flatten()).view_as(gates_Nk)
        dbias_D = dout_ND.sum(0) if ctx.needs_input_grad[2] else None
        dy_MD = dout_MD.mul_(gates_Nk.flatten().index_select(0, slot_M).unsqueeze(1))
        return dy_MD, dgates_Nk, dbias_D, None, None, None


def mix(
    y_MD: torch.Tensor, gates_Nk: torch.Tensor, bias_D: torch.Tensor, rank_Nk: torch.Tensor, token_M: torch.Tensor,
    slot_M: torch.Tensor,
) -> torch.Tensor:
    """`bias + Σ_j gates[n, j] · y[rank[n, j]]`: each token's k expert rows mixed by its gates in one gather, scale
    and sum pass (`embedding_bag` with per-sample weights), without a `[M, D]` temporary."""
    return _run(_Mix, y_MD, gates_Nk, bias_D, rank_Nk, token_M, slot_M)


# ----------------------------------------------------------------------------- GLU


class _SiluGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_M2F):
        ctx.save_for_backward(h_M2F)
        gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
        return F.silu(gate_MF).mul_(up_MF)  # one allocation: the output

    @staticmethod
    def backward(ctx, da_MF):
        (h_M2F,) = ctx.saved_tensors
        gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # the compiler fuses this itself (and takes no strided `out=`)
            dgate_MF = torch.ops.aten.silu_backward(da_MF * up_MF, gate_MF)
            return torch.cat([dgate_MF, F.silu(gate_MF) * da_MF], dim=-1)
        # Both halves are computed in place in the one output tensor: no temporaries.
        dh_M2F = torch.empty_like(h_M2F)
        dgate_MF, dup_MF = dh_M2F.chunk(2, dim=-1)
        torch.ops.aten.silu.out(gate_MF, out=dup_MF).mul_(da_MF)
        torch.mul(da_MF, up_MF, out=dgate_MF)
        torch.ops.aten.silu_backward.grad_input(dgate_MF, gate_MF, grad_input=dgate_MF)
        return dh_M2F


def silu_glu(h_M2F: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `h = (gate | up)`; the backward writes both halves of one gradient tensor (autograd's
    default would concatenate two)."""
    return _run(_SiluGLU, h_M2F)


# ----------------------------------------------------------------------------- rotary embeddings


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """`x * cos + sign * rotate_half(x) * sin` in two passes, where `rotate_half(x) = (-x2, x1)`."""
    h = x.shape[-1] // 2
    y = x * cos
    y[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-sign)
    y[..., h:].addcmul_(x[..., :h], sin[..., h:], value=sign)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # The transpose of the rotation: dx1 = dy1·cos1 + dy2·sin2, dx2 = dy2·cos2 - dy1·sin1.
        h = dy.shape[-1] // 2
        dx = dy * cos
        dx[..., :h].addcmul_(dy[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(dy[..., :h], sin[..., :h], value=-1.0)
        return dx, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding `x * cos + rotate_half(x) * sin` (cos/sin broadcast against x; they get no gradient), in
    two passes where the formula takes four."""
    return _run(_Rotary, x, cos, sin)


# ----------------------------------------------------------------------------- RMSNorm


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`rsqrt(mean(x²) + eps)` over the last dim, in fp32, in one pass with no fp32 copy of `x`."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = _rms_scale(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        # x · rstd computed in fp32 and rounded once to x's dtype (one pass), then scaled in place
        return torch.mul(x, rstd, out=torch.empty_like(x)).mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat32 = torch.mul(x, rstd)  # the fp32 normalized input
        dweight = None
        if ctx.needs_input_grad[1]:
            # As autograd does: the weight multiplies the normalized input rounded to x's dtype.
            dweight = (dy * xhat32.to(dy.dtype)).flatten(0, -2).sum(0, dtype=torch.float32).to(weight.dtype)
        dxhat32 = torch.mul(dy, weight, out=torch.empty_like(xhat32))
        # d/dx of x·rstd(x) = rstd · (dxhat - xhat · mean(dxhat · xhat)).
        mean_N1 = torch.linalg.vecdot(dxhat32, xhat32).unsqueeze(-1).div_(-x.shape[-1])
        dx32 = dxhat32.addcmul_(xhat32, mean_N1)
        dx = dx32.mul_(rstd) if x.dtype == torch.float32 else torch.mul(dx32, rstd, out=torch.empty_like(x))
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight · cast(x32 · rsqrt(mean(x32²) + eps))` with x32 = x in fp32 (transformers' JetMoeRMSNorm), in three
    passes over `x` where autograd's composition takes six and keeps fp32 copies for backward."""
    return _run(_RMSNorm, x, weight, eps)
