"""Helpers for comparing a fast kernel with its reference: gradients of a function, bf16-level errors."""

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """`‖a - b‖ / ‖b‖` in fp32, over the whole tensor (for bf16 results summed in other orders)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def grads(fn, *inputs, dy=None):
    """`(fn(*inputs), gradients of its floating-point inputs, dy)` for a random (or given) output gradient `dy`."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*inputs)
    dy = torch.randn_like(y) if dy is None else dy
    return y, torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy), dy


def assert_same_grads(fast, reference, *inputs, **tol):
    """`fast` and `reference` give the same output and input gradients for the same output gradient."""
    y, g, dy = grads(fast, *inputs)
    y_ref, g_ref, _ = grads(reference, *inputs, dy=dy)
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol)
