"""The LM head fused with the chunked cross-entropy against the logits path."""

import pytest
import torch

from jetmoe.kernels.cross_entropy import linear_cross_entropy
from jetmoe.losses import causal_lm_cross_entropy
from numerics import grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_linear_cross_entropy_matches_logits_path(dtype, chunk_rows):
    h, w = torch.randn(3, 7, 16, dtype=dtype), torch.randn(40, 16, dtype=dtype)
    labels = torch.randint(0, 40, (3, 7))
    labels[0, 3], labels[2, :4] = -100, -100
    three = torch.tensor(3.0)
    loss, (dh, dw), _ = grads(lambda a, b: linear_cross_entropy(a, b, labels, chunk_rows=chunk_rows), h, w, dy=three)
    ref, (dh_ref, dw_ref), _ = grads(lambda a, b: causal_lm_cross_entropy(a.float() @ b.float().t(), labels), h, w,
                                     dy=three)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(dh, dh_ref.to(dtype), **tol)
    torch.testing.assert_close(dw, dw_ref.to(dtype), **tol)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows), ref.detach(), **tol)


def test_bf16_inputs_computed_in_fp32_match_the_fp32_loss():
    h, w = torch.randn(2, 6, 16).bfloat16(), torch.randn(30, 16).bfloat16()
    labels = torch.randint(0, 30, (2, 6))
    loss = linear_cross_entropy(h, w, labels, compute_dtype=torch.float32)
    torch.testing.assert_close(loss, causal_lm_cross_entropy(h.float() @ w.float().t(), labels))


@pytest.mark.parametrize("spread", [1e2, 1e4])
def test_linear_cross_entropy_keeps_extreme_logits_finite(spread):
    """Logits so spread that most probabilities underflow to 0 in fp32 (the log-sum-exp comes from the largest
    logit's probability): the loss and its gradients still match fp32 `F.cross_entropy` on the logits."""
    h, w = torch.randn(2, 6, 16) * spread, torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 6))
    one = torch.tensor(1.0)
    loss, (dh, dw), _ = grads(lambda a, b: linear_cross_entropy(a, b, labels, chunk_rows=4), h, w, dy=one)
    ref, (dh_ref, dw_ref), _ = grads(lambda a, b: causal_lm_cross_entropy(a @ b.t(), labels), h, w, dy=one)
    assert torch.isfinite(loss) and loss > 1.0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5 * spread)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * spread)
