"""The grouped expert GEMM against one product per expert: forward, gradients, empty experts, layouts."""

import pytest
import torch

from jetmoe.kernels.grouped_mm import grouped_mm, grouped_mm_supported, rows_aligned


def _loop(x_MI, w_EOI, counts):
    return torch.cat([chunk @ w_EOI[e].T for e, chunk in enumerate(x_MI.split(counts))])


@pytest.mark.parametrize("dtype, upcast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_grouped_mm_equals_a_product_per_expert(dtype, upcast):
    counts = [5, 0, 9, 3]
    x = torch.randn(17, 16, dtype=dtype, requires_grad=True)
    w = (torch.randn(4, 24, 16) / 4).to(dtype).requires_grad_()
    offsets = torch.tensor(counts).cumsum(0).int()
    dy = torch.randn(17, 24, dtype=dtype)
    y = grouped_mm(x, w, offsets, upcast=upcast)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref = _loop(x, w, counts)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(a, b, **tol)
    assert dw.is_contiguous()  # the parameter's own [E, O, I] layout: autograd stores it without a copy
    assert dw[1].abs().sum() == 0  # an expert without rows gets no gradient


def test_inference_calls_the_kernel_and_compiles_to_the_custom_op():
    x, w, offsets = torch.randn(6, 8), torch.randn(2, 4, 8), torch.tensor([2, 6], dtype=torch.int32)
    with torch.no_grad():
        expected = grouped_mm(x, w, offsets)
    torch._dynamo.reset()
    compiled = torch.compile(grouped_mm, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, offsets), expected)
    torch._dynamo.reset()


def test_support_and_alignment_rules():
    assert grouped_mm_supported("cpu", torch.float32) and grouped_mm_supported("cpu", torch.bfloat16)
    assert rows_aligned(torch.float32, 8, 12) and not rows_aligned(torch.float32, 8, 5)
    assert rows_aligned(torch.bfloat16, 8, 16) and not rows_aligned(torch.bfloat16, 12)
