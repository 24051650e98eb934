"""Gradient norms and clipping for gradients on several meshes: on plain tensors they are torch's own (the sharded
cases are checked against one process in test_expert_parallel.py)."""

from __future__ import annotations

import math

import pytest
import torch

from jetmoe.distributed import clip_grad_norm_, total_norm


def _grads(scale: float) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (5,), (2, 2, 2))]
    for i, p in enumerate(params):
        p.grad = scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_of_plain_tensors_is_torchs(norm_type):
    grads = [p.grad for p in _grads(1.0)]
    torch.testing.assert_close(total_norm(grads, norm_type), torch.nn.utils.get_total_norm(grads, norm_type))


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the max norm
def test_clipping_plain_gradients_is_torchs(scale):
    ours, theirs = _grads(scale), _grads(scale)
    norm = clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm == expected
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert total_norm([p.grad for p in ours]) == pytest.approx(min(float(norm), 1.0), rel=1e-5)


def test_no_gradients_have_norm_zero():
    assert clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0
