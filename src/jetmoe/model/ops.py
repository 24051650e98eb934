"""Low-level ops of the model, each with a hand-written backward where autograd's default costs extra passes over
memory or extra allocations: the grouped expert GEMM, row permutations and token dispatch (gathers whose backward
is a gather too, never an accumulating scatter), the gated mix of the k expert outputs, the causal attention
backward for bf16 on CPUs, the GLU and rotary embeddings. Plus the bf16 matmul policy for CPUs without bf16 units
(`upcast_bf16`), for a few fp32 rows (decoding) the BLAS form this CPU runs faster (`few_rows_form_faster`), and
the attention of one query row for compiled decode steps on CPUs (`single_query_attention`).

Every op here is tested against a plain-PyTorch reference, forward and gradients (tests/model/test_fast_paths.py).

Shape letters: N tokens, k experts per token, M = N·k routed rows, E experts, D model width,
I/O a matrix's input/output width.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- bf16 on CPUs without bf16 units


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); unknown platforms are trusted to."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch._dynamo.assume_constant_result  # a Python constant while tracing: no graph break
def upcast_bf16(device_type: str, dtype: torch.dtype) -> bool:
    """Run bf16 matmuls and attention in fp32 (inputs upcast, outputs rounded back to bf16)?

    Yes on a CPU without bf16 units: there oneDNN emulates bf16 GEMMs at about a third of the fp32 speed, while
    the upcast is one pass over the inputs. The result is a bf16 GEMM with fp32 accumulation, as on a GPU."""
    return device_type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16_units()


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


# ----------------------------------------------------------------------------- few-row products (CPU, fp32)

FEW_ROWS = 16  # at most this many fp32 rows on the CPU may take `few_rows_product` in `linear`
_FEW_ROWS_POW2 = tuple(1 << i for i in reversed(range(FEW_ROWS.bit_length())))  # 16, 8, 4, 2, 1: one timing each
_TIMING_BYTES = 48 << 20  # weights streamed per timing: more than a last-level cache holds
_TIMING_MAX_MATRICES = 512  # tiny weights: fewer (a model of them stays in cache anyway)


def few_rows_linear(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """`x @ w^T` computed as `(w @ x^T)^T`. Which form BLAS runs faster for a few fp32 rows depends on the CPU, the
    row count and the weight's shape (weights read from memory): on an AMD EPYC without AVX-512 this one for 1–4
    rows by 512 inputs (1.3–1.5× faster at 1 row, 1.5–3× at 2), but for 1 or 4 rows by 1024 inputs `F.linear`
    or neither; on an Intel Xeon (Cascade Lake) `F.linear` for 1–3 rows, this one from about 8.
    `few_rows_form_faster` times both."""
    return torch.mm(w_OI, x_MI.t()).t()


def few_rows_padded(rows):
    """How many rows `few_rows_linear` multiplies for `rows` rows (an int, SymInt or integer tensor): an odd count
    below 4 takes one more (a spare row whose output is dropped), since BLAS streams a weight faster for 2 and 4
    rows than for 1 and 3 (MKL, an AMD EPYC, fp32 2048 x 512 weight from memory: 1 to 5 rows 285, 182, 267, 216,
    282 µs)."""
    return rows + ((rows % 2 == 1) & (rows < 4))


def few_rows_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w^T` for any leading shape as `few_rows_linear`, on `few_rows_padded` rows (zero rows appended)."""
    rows = x.shape[:-1].numel()
    x_MI = x.reshape(rows, x.shape[-1])
    spare = few_rows_padded(rows) - rows
    y_MO = few_rows_linear(F.pad(x_MI, (0, 0, 0, spare)) if spare else x_MI, w)
    return (y_MO[:rows] if spare else y_MO).reshape(*x.shape[:-1], w.shape[0])


def few_rows_form_faster(rows: int | torch.SymInt, out_features: int, in_features: int) -> bool:
    """Whether this CPU's BLAS multiplies `rows` (1 to `FEW_ROWS`) fp32 rows by an `[out_features, in_features]`
    weight faster (by >5 %) as `few_rows_product` than as `F.linear`, as decoding does: weights streamed from
    memory. Timed once per process, weight shape and power of two of rows (the one at or below `rows` decides),
    when first asked: ~0.1 s each. Compiled with dynamic shapes, a symbolic `rows` guards only on its
    power-of-two range; the weight's shape must be static (a parameter's is)."""
    pow2 = next(p for p in _FEW_ROWS_POW2 if rows >= p)
    return _few_rows_form_faster_pow2(pow2, out_features, in_features)


@torch._dynamo.assume_constant_result  # a Python constant while tracing: no graph break
def _few_rows_form_faster_pow2(rows: int, out_features: int, in_features: int) -> bool:
    return _time_few_rows_forms(rows, out_features, in_features)


@functools.cache
def _time_few_rows_forms(rows: int, out_features: int, in_features: int) -> bool:
    count = max(1, min(_TIMING_MAX_MATRICES, _TIMING_BYTES // (out_features * in_features * 4)))
    best = {F.linear: float("inf"), few_rows_product: float("inf")}
    with torch.no_grad():
        ws = torch.ones(count, out_features, in_features).unbind()
        x = torch.ones(rows, in_features)
        for _ in range(5):
            for product in best:
                start = time.perf_counter()
                for w in ws:
                    product(x, w)
                best[product] = min(best[product], time.perf_counter() - start)
    return best[few_rows_product] < 0.95 * best[F.linear]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear` without bias, following the bf16 policy of `upcast_bf16`. At most `FEW_ROWS` fp32 rows on the
    CPU (decoding) take `few_rows_product` where this CPU's BLAS runs that form faster."""
    if upcast_bf16(x.device.type, x.dtype):
        return _UpcastLinear.apply(x, w)
    rows = x.shape[:-1].numel()
    if x.device.type == "cpu" and x.dtype == torch.float32 and 0 < rows <= FEW_ROWS and few_rows_form_faster(
        rows, *w.shape
    ):
        return few_rows_product(x, w)
    return F.linear(x, w)


# ----------------------------------------------------------------------------- grouped GEMM

_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}
UPCAST_MIN_ROWS = 256  # below this (decoding), converting all expert weights to fp32 would cost more than it saves


@torch._dynamo.assume_constant_result
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs the two forms the experts use (`x @ w_e` and the per-expert weight
    gradient `dy_e^T @ x_e`) for this device type and dtype; probed once, without autograd (so a first call
    inside an activation-checkpointed block saves no tensors)."""
    key = (device_type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        try:
            with torch.no_grad():
                x = torch.ones(32, 16, device=device_type, dtype=dtype)  # no RNG draws: training streams unchanged
                w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
                offsets = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
                torch._grouped_mm(x, w, offs=offsets)
                torch._grouped_mm(x.t(), x, offs=offsets)
            _GROUPED_MM_SUPPORT[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM_SUPPORT[key] = False
    return _GROUPED_MM_SUPPORT[key]


def _maybe_upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = tensors[0]
    if x.shape[0] >= UPCAST_MIN_ROWS and upcast_bf16(x.device.type, x.dtype):
        return tuple(t.float() for t in tensors)
    return tensors


def _grouped_mm_impl(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    dtype = x_MI.dtype
    x_MI, w_EIO = _maybe_upcast(x_MI, w_EIO)
    return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E).to(dtype)


@torch.library.custom_op("jetmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_impl(x_MI, w_EIO, offsets_E)


def grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x_MI` times `w_EIO[e]`. Compiled or differentiated it runs as the
    opaque custom op `jetmoe::grouped_mm` (which compiles for every dtype the device runs, where the built-in
    `torch._grouped_mm` fake kernel only admits bf16); plain inference calls the kernel directly (decoding
    calls it dozens of times per token, and the custom-op dispatch costs tens of microseconds)."""
    needs_grad = torch.is_grad_enabled() and (x_MI.requires_grad or w_EIO.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        return _grouped_mm_op(x_MI, w_EIO, offsets_E)
    return _grouped_mm_impl(x_MI, w_EIO, offsets_E)


@torch.library.custom_op("jetmoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(dy_MO: torch.Tensor, x_MI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert `dy_e^T @ x_e`: the `[E, O, I]` gradient of the `[E, O, I]` weight whose transpose
    `grouped_mm` multiplies by (the parameter's own layout, so autograd stores it without a copy)."""
    dtype = dy_MO.dtype
    dy_MO, x_MI = _maybe_upcast(dy_MO, x_MI)
    return torch._grouped_mm(dy_MO.t(), x_MI, offs=offsets_E).to(dtype)


@_grouped_mm_op.register_fake
def _(x_MI, w_EIO, offsets_E):
    return x_MI.new_empty(x_MI.shape[0], w_EIO.shape[-1])


@grouped_mm_weight_grad.register_fake
def _(dy_MO, x_MI, offsets_E):
    return x_MI.new_empty(offsets_E.shape[0], dy_MO.shape[1], x_MI.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy_MO):
    x_MI, w_EIO, offsets_E = ctx.saved_tensors
    dy_MO = dy_MO.contiguous()
    dx_MI = _grouped_mm_op(dy_MO, w_EIO.transpose(-2, -1), offsets_E) if ctx.needs_input_grad[0] else None
    dw_EIO = None
    if ctx.needs_input_grad[1]:
        dw_EIO = grouped_mm_weight_grad(dy_MO, x_MI, offsets_E).transpose(-2, -1)
    return dx_MI, dw_EIO, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


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
    return _GatherRows.apply(x, index, inverse)


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
    """`x_ND[token_M]`: every token copied to its k routed rows (sorted by expert). `rank_Nk[n, j]` is the row of
    token n's j-th copy, so the backward sums each token's k gradient rows in one gather-and-sum pass
    (`embedding_bag`), with no scatter-add."""
    return _DispatchTokens.apply(x_ND, token_M, rank_Nk)


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
    """`bias + Σ_j gates[n, j] · y[rank[n, j]]`: each token's k expert rows mixed by its gates in one gather,
    scale and sum pass (`embedding_bag` with per-sample weights), without a `[M, D]` temporary."""
    return _Mix.apply(y_MD, gates_Nk, bias_D, rank_Nk, token_M, slot_M)


# ----------------------------------------------------------------------------- causal attention (CPU, bf16)

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
    computes its scores in fp32, ~1.7x slower on this project's CPU). Each block's scores are computed twice: once
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


def causal_attention_applies(
    q_BQTD: torch.Tensor, k_BHTD: torch.Tensor, mask: torch.Tensor | None, dropout: float, is_causal: bool
) -> bool:
    """Does `causal_attention` apply? Causal self-attention (as many keys as queries), no mask or dropout, bf16
    on a CPU with bf16 units, and differentiated (eager or compiled). There the CPU flash kernel runs its backward
    in fp32 (about 5x its forward's time) and its forward's scores in fp32 too."""
    return (
        is_causal and mask is None and dropout == 0.0 and q_BQTD.shape[2] == k_BHTD.shape[2]
        and q_BQTD.device.type == "cpu" and q_BQTD.dtype == torch.bfloat16 and torch.is_grad_enabled()
        and q_BQTD.requires_grad and not upcast_bf16("cpu", torch.bfloat16)
    )


def causal_attention(q_BQTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention (query head i uses key/value head i // (Q / H)) with the default scale:
    forward by `_causal_attention_forward`, backward by `_causal_attention_backward`; the custom op
    `jetmoe::causal_attention`, so that a compiled training step takes them too."""
    return _causal_attention_op(q_BQTD, k_BHTD, v_BHTD)[0]


def mask_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention scores under `mask`: boolean (True: attend; the rest set to the dtype's lowest value) or
    additive."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def single_query_attention_applies(q_BQTD: torch.Tensor, dropout: float) -> bool:
    """Does `single_query_attention` apply? One query row (a decode step), compiled, on the CPU, no dropout."""
    return torch.compiler.is_compiling() and q_BQTD.device.type == "cpu" and q_BQTD.shape[2] == 1 and dropout == 0.0


def single_query_attention(
    q_BQ1D: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Grouped-query attention of one query row (query head i uses key/value head i // (Q / H)), default scale,
    `mask` boolean (True: attend) or additive, broadcastable to `[B, 1, 1, S]`: each key/value head's G query
    heads become G query rows of two small matrix products. Compiled on the CPU (C++ wrapper), SDPA's flash kernel
    took ~0.1 ms more a call for one row against 72 keys, and this made the bench's decode step 2-3 % faster.
    (Written as multiply-sum reductions instead, Inductor fuses the query's rotary embedding into the score loop
    and recomputes it for every key: slower than SDPA.)"""
    B, Q, _, Dh = q_BQ1D.shape
    H, S = k_BHSD.shape[1], k_BHSD.shape[2]
    q_BHGD = q_BQ1D.reshape(B, H, Q // H, Dh)
    scores_BHGS = (q_BHGD @ k_BHSD.transpose(-2, -1)).float() * Dh**-0.5
    if mask is not None:
        scores_BHGS = mask_scores(scores_BHGS, mask.reshape(mask.shape[0], 1, 1, S))
    o_BHGD = scores_BHGS.softmax(-1).to(v_BHSD.dtype) @ v_BHSD
    return o_BHGD.reshape(B, Q, 1, Dh)


def argmax_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` (values, indices) as k argmax passes, each masking the last pick: Inductor fuses them
    into a few C++ loops. For compiled decode steps on the CPU, where aten's topk on a few router logits costs
    more (a compiled call of either alone, C++ wrapper, 8 logits, top-2: 107 against 68 µs). Ties go to the
    lower index."""
    values, indices = [], []
    for _ in range(k):
        index = x.argmax(-1, keepdim=True)
        values.append(x.gather(-1, index))
        indices.append(index)
        x = x.scatter(-1, index, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


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


def glu(h_M2F: torch.Tensor, activation) -> torch.Tensor:
    """`act(gate) * up` for `h = (gate | up)`; with SiLU the backward writes both halves of one gradient tensor
    (autograd's default would concatenate two)."""
    if activation is F.silu:
        return _SiluGLU.apply(h_M2F)
    gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
    return activation(gate_MF) * up_MF


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
    """Rotary embedding `x * cos + rotate_half(x) * sin` (cos/sin broadcast against x; they get no gradient)."""
    return _Rotary.apply(x, cos, sin)


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
    """`weight · cast(x32 · rsqrt(mean(x32²) + eps))` with x32 = x in fp32 (transformers' JetMoeRMSNorm), in
    three passes over `x` where autograd's composition takes six and keeps fp32 copies for backward."""
    return _RMSNorm.apply(x, weight, eps)
