"""Causal grouped-query attention for bf16 on CPUs with bf16 units, forward and backward in batched bf16 GEMMs.

The CPU flash kernel of `F.scaled_dot_product_attention` computes its scores in fp32 and runs its backward in fp32
too; on a CPU with bf16 matrix units (AVX512-BF16, AMX) blocked bf16 GEMMs (oneDNN) do both faster. The custom op
`jetmoe::causal_attention` carries a registered backward, so compiled training steps take it too. What it gains is
measured by `bench/bench_vs_transformers.py` (the bf16 training rows) and its accuracy against fp32 attention by
tests/kernels/test_cpu.py.

Shape letters: B batch, Q query heads, H key/value heads, G = Q / H, T positions, Dh head dim, N = B·H.
"""

from __future__ import annotations

import torch

ATTN_BLOCK = 64  # query positions per block of the forward and the backward
ATTN_CHUNK_ELEMENTS = 2**21  # score elements per block and group of heads (4 MiB in bf16)


def _hi_lo(x32: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`x32` as the sum of two `dtype` tensors (about 16 significant bits where one bf16 holds 8)."""
    hi = x32.to(dtype)
    return hi, (x32 - hi).to(dtype)


def _key_rows(x_BHTD: torch.Tensor, tail_BHTC: torch.Tensor) -> torch.Tensor:
    """`[N, Dh + C, T]` (N = B·H): each key/value head transposed, with C extra rows `tail`."""
    B, H, T, Dh = x_BHTD.shape
    out = x_BHTD.new_empty(B, H, Dh + tail_BHTC.shape[-1], T)
    out[:, :, :Dh].copy_(x_BHTD.transpose(-2, -1))
    out[:, :, Dh:].copy_(tail_BHTC.transpose(-2, -1))
    return out.view(B * H, -1, T)


def _query_rows(x_BQTD: torch.Tensor, tail_BQTC: torch.Tensor, H: int) -> torch.Tensor:
    """`[N, T·G, Dh + C]`: the G query heads of each key/value head as rows ordered (position, head), so that a
    block of positions is a block of rows; plus C extra columns `tail`."""
    B, Q, T, Dh = x_BQTD.shape
    G, C = Q // H, tail_BQTC.shape[-1]
    out = x_BQTD.new_empty(B, H, T, G, Dh + C)
    out[..., :Dh].copy_(x_BQTD.view(B, H, G, T, Dh).transpose(2, 3))
    out[..., Dh:].copy_(tail_BQTC.view(B, H, G, T, C).transpose(2, 3))
    return out.view(B * H, T * G, Dh + C)


def _causal_blocks(q_BQTD: torch.Tensor, H: int):
    """The blocks both passes walk: `(heads, rows, t0, t1, future)` for each group of heads and block of query
    positions t0 <= t < t1 (rows `t0·G : t1·G`), `future` masking the keys s > t of the block's diagonal."""
    B, Q, T, _ = q_BQTD.shape
    G, Tb = Q // H, min(ATTN_BLOCK, T)
    pos = torch.arange(Tb, device=q_BQTD.device)
    future_RT = (pos[None, :] > pos[:, None]).repeat_interleave(G, 0)  # row (t, head) sees key s <= t
    heads = max(1, ATTN_CHUNK_ELEMENTS // (Tb * G * T))
    for n0 in range(0, B * H, heads):
        for t0 in range(0, T, Tb):
            t1 = min(t0 + Tb, T)
            yield slice(n0, n0 + heads), slice(t0 * G, t1 * G), t0, t1, future_RT[: (t1 - t0) * G, : t1 - t0]


def _causal_attention_forward(q_BQTD, k_BHTD, v_BHTD):
    """Attention forward by blocks of query positions, every product a batched bf16 GEMM (the CPU flash kernel
    computes its scores in fp32). Each block's scores are computed twice: once
    for their row maxima m, then with -m riding in the GEMM as an extra column, so that the GEMM outputs `S - m`,
    accurate in bf16 near the probabilities that matter. Returns O and the logsumexp (fp32), both in `[B, T, Q]`
    memory, as the flash kernel does."""
    B, Q, T, Dh = q_BQTD.shape
    H = k_BHTD.shape[1]
    G, N, scale = Q // H, B * H, Dh**-0.5
    q_NRX = _query_rows(q_BQTD, q_BQTD.new_zeros(B, Q, T, 1), H)  # R = T·G rows, X = Dh + 1
    kT_NXT = _key_rows(k_BHTD, k_BHTD.new_ones(B, H, T, 1))
    v_NTD = v_BHTD.reshape(N, T, Dh)
    m_NR = q_BQTD.new_empty(N, T * G)
    l_NR = q_BQTD.new_empty(N, T * G, dtype=torch.float32)
    pv_NRD = q_BQTD.new_empty(N, T * G, Dh)
    for n, r, t0, t1, future_RT in _causal_blocks(q_BQTD, H):
        s_NRT = torch.bmm(q_NRX[n, r, :Dh], kT_NXT[n, :Dh, :t1])
        s_NRT[:, :, t0:].masked_fill_(future_RT, float("-inf"))
        torch.amax(s_NRT, -1, out=m_NR[n, r])
        torch.neg(m_NR[n, r], out=q_NRX[n, r, Dh])
        p_NRT = torch.bmm(q_NRX[n, r], kT_NXT[n, :, :t1]).mul_(scale).exp_()  # exp(scale·(S - m))
        p_NRT[:, :, t0:].masked_fill_(future_RT, 0.0)
        torch.sum(p_NRT, -1, dtype=torch.float32, out=l_NR[n, r])
        torch.bmm(p_NRT, v_NTD[n, :t1], out=pv_NRD[n, r])

    def as_BTHG(x_NR: torch.Tensor) -> torch.Tensor:
        return x_NR.view(B, H, T, G, *x_NR.shape[2:]).transpose(1, 2)

    o_BTHGD = q_BQTD.new_empty(B, T, H, G, Dh)
    torch.div(as_BTHG(pv_NRD), as_BTHG(l_NR).unsqueeze(-1), out=o_BTHGD)
    lse_BTHG = torch.log(as_BTHG(l_NR)).add_(as_BTHG(m_NR), alpha=scale)
    return o_BTHGD.view(B, T, Q, Dh).transpose(1, 2), lse_BTHG.reshape(B, T, Q).transpose(1, 2)


def _causal_attention_backward(q_BQTD, k_BHTD, v_BHTD, o_BQTD, lse_BQT, do_BQTD):
    """Flash-attention backward by blocks of query positions, every product a batched bf16 GEMM (oneDNN / AMX).

    The logsumexp and `D = rowsum(dO ∘ O)` ride in the GEMMs as two extra columns each (hi and lo bf16 parts),
    so the GEMMs output `S - lse` and `dP - D` directly: small near the probabilities that matter, where bf16
    keeps them accurate. The elementwise work (scale and exp, the causal mask, `P ∘ (dP - D)`) runs in place on
    blocks that stay in cache; key/value gradients accumulate in fp32."""
    B, Q, T, Dh = q_BQTD.shape
    H, dtype = k_BHTD.shape[1], q_BQTD.dtype
    G, N, scale = Q // H, B * H, Dh**-0.5
    ones_BHT2 = k_BHTD.new_ones(B, H, T, 2)
    q_NRX = _query_rows(q_BQTD, torch.stack(_hi_lo(lse_BQT / -scale, dtype), -1), H)  # R = T·G rows, X = Dh + 2
    D_BQT = torch.linalg.vecdot(do_BQTD.float(), o_BQTD.float())
    do_NRX = _query_rows(do_BQTD, torch.stack(_hi_lo(-D_BQT, dtype), -1), H)
    kT_NXT, vT_NXT = _key_rows(k_BHTD, ones_BHT2), _key_rows(v_BHTD, ones_BHT2)
    k_NTD = k_BHTD.reshape(N, T, Dh)

    dq_NRD = q_BQTD.new_empty(N, T * G, Dh)
    dkT_NDT = torch.zeros(N, Dh, T, device=q_BQTD.device)
    dvT_NDT = torch.zeros_like(dkT_NDT)
    for n, r, t0, t1, future_RT in _causal_blocks(q_BQTD, H):
        p_NRT = torch.bmm(q_NRX[n, r], kT_NXT[n, :, :t1]).mul_(scale).exp_()
        p_NRT[:, :, t0:].masked_fill_(future_RT, 0.0)
        ds_NRT = torch.bmm(do_NRX[n, r], vT_NXT[n, :, :t1]).mul_(p_NRT)  # P ∘ (dP - D)
        dq_NRD[n, r] = torch.bmm(ds_NRT, k_NTD[n, :t1])
        dkT_NDT[n, :, :t1].add_(torch.bmm(q_NRX[n, r, :Dh].transpose(1, 2), ds_NRT))
        dvT_NDT[n, :, :t1].add_(torch.bmm(do_NRX[n, r, :Dh].transpose(1, 2), p_NRT))

    dq_BQTD = torch.empty_like(q_BQTD)
    torch.mul(dq_NRD.view(B, H, T, G, Dh).transpose(2, 3), scale, out=dq_BQTD.view(B, H, G, T, Dh))
    dk_BHTD = dkT_NDT.mul_(scale).view(B, H, Dh, T).transpose(-2, -1).to(dtype)
    dv_BHTD = dvT_NDT.view(B, H, Dh, T).transpose(-2, -1).to(dtype)
    return dq_BQTD, dk_BHTD, dv_BHTD


@torch.library.custom_op("jetmoe::causal_attention", mutates_args=())
def _causal_attention_op(
    q_BQTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _causal_attention_forward(q_BQTD, k_BHTD, v_BHTD)


@_causal_attention_op.register_fake
def _(q_BQTD, k_BHTD, v_BHTD):
    B, Q, T, Dh = q_BQTD.shape
    o_BQTD = q_BQTD.new_empty(B, T, Q, Dh).transpose(1, 2)
    return o_BQTD, q_BQTD.new_empty(B, T, Q, dtype=torch.float32).transpose(1, 2)


@torch.library.custom_op("jetmoe::causal_attention_backward", mutates_args=())
def _causal_attention_backward_op(
    q_BQTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, o_BQTD: torch.Tensor, lse_BQT: torch.Tensor,
    do_BQTD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_attention_backward(q_BQTD, k_BHTD, v_BHTD, o_BQTD, lse_BQT, do_BQTD)


@_causal_attention_backward_op.register_fake
def _(q_BQTD, k_BHTD, v_BHTD, o_BQTD, lse_BQT, do_BQTD):
    B, H, T, Dh = k_BHTD.shape
    dk_BHTD = k_BHTD.new_empty(B, H, Dh, T).transpose(-2, -1)  # the layouts `_causal_attention_backward` returns
    return torch.empty_like(q_BQTD), dk_BHTD, torch.empty_like(dk_BHTD)


def _causal_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _causal_attention_autograd(ctx, do_BQTD, dlse_BQT):
    return _causal_attention_backward_op(*ctx.saved_tensors, do_BQTD)


_causal_attention_op.register_autograd(_causal_attention_autograd, setup_context=_causal_attention_setup_context)


def causal_attention(q_BQTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention (query head i uses key/value head i // G) with the default scale, as
    `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`, for as many keys as queries."""
    return _causal_attention_op(q_BQTD, k_BHTD, v_BHTD)[0]
