"""The CPU-only kernels: blocked bf16 causal attention against fp32 attention, the fp32 upcast of bf16 matmuls,
and the few-row product form."""

import platform

import pytest
import torch
import torch.nn.functional as F
from numerics import grads, relative_error
from torch._dynamo.testing import EagerAndRecordGraphs

from jetmoe.kernels.cpu import attention
from jetmoe.kernels.cpu.bf16 import has_bf16_units, upcast_linear
from jetmoe.kernels.cpu.decode import FEW_ROWS, few_row_linear, few_rows_padded


def _gqa_inputs(B=2, T=37, H=2, G=2, Dh=16, peak=4.0):
    """bf16 q `[B, H·G, T, Dh]`, k and v `[B, H, T, Dh]` as the model lays them out (strided views), and dO."""
    q = (torch.randn(B, T, H * G, Dh) * peak).bfloat16().transpose(1, 2)  # peaked: some rows near one-hot
    kv = torch.randn(B, T, 2, H, Dh).bfloat16()
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), torch.randn(B, H * G, T, Dh).bfloat16()


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("block, chunk", [(8, 64), (64, 2**21)])  # several blocks and head groups; one block
def test_causal_attention_matches_fp32_attention(block, chunk, monkeypatch):
    monkeypatch.setattr(attention, "ATTN_BLOCK", block)
    monkeypatch.setattr(attention, "ATTN_CHUNK_ELEMENTS", chunk)
    q, k, v, do = _gqa_inputs()
    o, g, _ = grads(attention.causal_attention, q, k, v, dy=do)
    o_flash, g_flash, _ = grads(_sdpa, q, k, v, dy=do)
    o_ref, g_ref, _ = grads(_sdpa, q.float(), k.float(), v.float(), dy=do.float())
    assert o.dtype == torch.bfloat16 and o.shape == o_ref.shape
    err, err_flash = (relative_error(x, o_ref) for x in (o, o_flash))
    assert err < max(2 * err_flash, 4e-3), (err, err_flash)  # bf16 level, as the flash kernel's forward
    T, G = q.shape[2], q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(G, 1).transpose(-2, -1) * q.shape[-1] ** -0.5
    lse_ref = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    lse = attention._causal_attention_op(q, k, v)[1]
    assert lse.dtype == torch.float32 and (lse - lse_ref).abs().max() < 1e-2
    for a, a_flash, a_ref in zip(g, g_flash, g_ref):
        assert a.dtype == torch.bfloat16 and a.shape == a_ref.shape
        err, err_flash = (relative_error(x, a_ref) for x in (a, a_flash))
        assert err < max(3 * err_flash, 4e-3), (err, err_flash)  # bf16 level, as flash's own bf16 backward


def test_compiled_causal_attention_is_the_custom_op_with_eager_numbers():
    q, k, v, do = _gqa_inputs()
    torch._dynamo.reset()
    graphs = EagerAndRecordGraphs()
    torch.compile(attention.causal_attention, fullgraph=True, backend=graphs)(q.requires_grad_(), k, v)
    assert "jetmoe.causal_attention" in graphs.graphs[0].code
    # Through AOT autograd (the op's registered backward traced into the backward graph): eager's numbers.
    torch._dynamo.reset()
    compiled = torch.compile(attention.causal_attention, fullgraph=True, backend="aot_eager")
    o, g, _ = grads(compiled, q, k, v, dy=do)
    o_eager, g_eager, _ = grads(attention.causal_attention, q, k, v, dy=do)
    assert torch.equal(o, o_eager)
    for a, b in zip(g, g_eager):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_bf16_units_are_torch_s_answer():
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert has_bf16_units() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    else:
        assert has_bf16_units()


def test_upcast_linear_is_fp32_math_rounded_to_bf16():
    x, w = torch.randn(9, 16).bfloat16(), torch.randn(24, 16).bfloat16()
    y, (dx, dw), dy = grads(upcast_linear, x, w)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    y_ref, (dx_ref, dw_ref), _ = grads(F.linear, x.float(), w.float(), dy=dy.float())
    torch.testing.assert_close(y, y_ref.bfloat16())
    torch.testing.assert_close(dx, dx_ref.bfloat16())
    torch.testing.assert_close(dw, dw_ref.bfloat16())


def test_few_rows_padded_makes_odd_counts_below_four_even():
    assert [few_rows_padded(rows) for rows in range(8)] == [0, 2, 2, 4, 4, 5, 6, 7]


@pytest.mark.parametrize("shape", [(16,), (1, 1, 16), (2, 16), (3, 16), (2, 2, 16), (5, 16), (FEW_ROWS, 16)])
def test_few_row_linear_equals_f_linear(shape):
    x, w = torch.randn(shape), torch.randn(24, 16)
    y, (dx, dw), dy = grads(few_row_linear, x, w)
    y_ref, (dx_ref, dw_ref), _ = grads(F.linear, x, w, dy=dy)
    assert y.shape == y_ref.shape
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(a, b)
