"""The device-agnostic fused kernels against the reference operations they replace, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_same_grads

from jetmoe.kernels import fused
from jetmoe.model.ops import ReferenceOps
from jetmoe.model.routing import Routing, TopKRouter

REF = ReferenceOps()


def _routing(tokens=23, experts=5, top_k=2, dim=16):
    return TopKRouter(dim, experts, top_k)(torch.randn(tokens, dim))


def test_gather_rows_is_indexing_with_a_gather_backward():
    index = torch.randperm(10)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(10))
    assert_same_grads(lambda t: fused.gather_rows(t, index, inverse), lambda t: t[index], torch.randn(10, 3))


def test_dispatch_tokens_is_the_reference_dispatch():
    routing = _routing()
    assert_same_grads(lambda t: fused.dispatch_tokens(t, routing.token_M, routing.rank_Nk),
                      lambda t: REF.dispatch(t, routing), torch.randn(23, 16))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mix_is_the_reference_combine(top_k):
    routing = _routing(top_k=top_k)

    def fast(y, g, b):
        return fused.mix(y, g, b, routing.rank_Nk, routing.token_M, routing.slot_M)

    def reference(y, g, b):  # the gates as an input, to check their gradient too
        return REF.combine(y, Routing(routing.logits_NE, routing.experts_Nk, g), b)

    assert_same_grads(fast, reference,
                      torch.randn(23 * top_k, 16), routing.gates_Nk.detach(), torch.randn(16))


@pytest.mark.parametrize("compiled", [False, True])
def test_silu_glu_is_the_reference_glu(compiled):
    fn = fused.silu_glu
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same_grads(fn, lambda h: REF.glu(h, F.silu), torch.randn(7, 12))


def test_rotary_is_the_rotate_half_formula():
    angles = torch.randn(2, 5, 1, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert_same_grads(lambda t: fused.rotary(t, cos, sin), lambda t: REF.rotary(t, cos, sin), torch.randn(2, 5, 3, 8))


@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_rms_norm_is_transformers_formula(dtype, compiled):
    fn = lambda t, w: fused.rms_norm(t, w, 1e-6)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    # bf16: the fp32 statistics may round the last bit differently
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_same_grads(fn, lambda t, w: REF.rms_norm(t, w, 1e-6), (torch.randn(2, 5, 16) * 3).to(dtype),
                      (torch.rand(16) + 0.5).to(dtype), **tol)
