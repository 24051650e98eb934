"""Comparing tensors computed in bf16 by different kernels (sums in other orders before rounding)."""

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """`‖a - b‖ / ‖b‖` in fp32, over the whole tensor."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()
