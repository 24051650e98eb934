"""All experts' products in one grouped GEMM: rows sorted by expert, `offsets[e]` the end of expert e's rows.

`torch._grouped_mm` multiplies every expert's slice without reading the row counts on the host, so the MoE layers
never synchronise with the device and compile into one graph. Its backward is registered here (the input gradient
is another grouped GEMM, the weight gradient a per-expert `dy_e^T @ x_e`) in the parameter's own `[E, O, I]`
layout, so autograd stores it without a copy.

Shape letters: M routed rows, E experts, I/O an expert's input/output width.
"""

from __future__ import annotations

import torch

_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


@torch._dynamo.assume_constant_result
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs the two forms the experts use (`x @ w_e` and `dy_e^T @ x_e`) for this device
    type and dtype: asked once of torch itself, by running both on tiny inputs without autograd (no RNG draws, and a
    first call inside an activation-checkpointed block saves no tensors)."""
    key = (device_type, dtype)
    if key not in _SUPPORT:
        try:
            with torch.no_grad():
                x = torch.ones(32, 16, device=device_type, dtype=dtype)
                w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
                offsets = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
                torch._grouped_mm(x, w, offs=offsets)
                torch._grouped_mm(x.t(), x, offs=offsets)
            _SUPPORT[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _SUPPORT[key] = False
    return _SUPPORT[key]


def rows_aligned(dtype: torch.dtype, *widths: int) -> bool:
    """`torch._grouped_mm` needs every matrix row to be a multiple of 16 bytes."""
    return all(width * dtype.itemsize % 16 == 0 for width in widths)


def _compute(upcast: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in tensors) if upcast else tensors


def _grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor, upcast: bool) -> torch.Tensor:
    dtype = x_MI.dtype
    x_MI, w_EIO = _compute(upcast, x_MI, w_EIO)
    return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E).to(dtype)


@torch.library.custom_op("jetmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor, upcast: bool) -> torch.Tensor:
    return _grouped_mm(x_MI, w_EIO, offsets_E, upcast)


@torch.library.custom_op("jetmoe::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(dy_MO: torch.Tensor, x_MI: torch.Tensor, offsets_E: torch.Tensor, upcast: bool) -> torch.Tensor:
    """Per-expert `dy_e^T @ x_e`: the `[E, O, I]` gradient of the `[E, O, I]` weight whose transpose `grouped_mm`
    multiplies by."""
    dtype = dy_MO.dtype
    dy_MO, x_MI = _compute(upcast, dy_MO, x_MI)
    return torch._grouped_mm(dy_MO.t(), x_MI, offs=offsets_E).to(dtype)


@_grouped_mm_op.register_fake
def _(x_MI, w_EIO, offsets_E, upcast):
    return x_MI.new_empty(x_MI.shape[0], w_EIO.shape[-1])


@_weight_grad_op.register_fake
def _(dy_MO, x_MI, offsets_E, upcast):
    return x_MI.new_empty(offsets_E.shape[0], dy_MO.shape[1], x_MI.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.upcast = inputs[3]


def _backward(ctx, dy_MO):
    x_MI, w_EIO, offsets_E = ctx.saved_tensors
    dy_MO = dy_MO.contiguous()
    dx_MI = _grouped_mm_op(dy_MO, w_EIO.transpose(-2, -1), offsets_E, ctx.upcast) if ctx.needs_input_grad[0] else None
    dw_EIO = None
    if ctx.needs_input_grad[1]:
        dw_EIO = _weight_grad_op(dy_MO, x_MI, offsets_E, ctx.upcast).transpose(-2, -1)
    return dx_MI, dw_EIO, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_MI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x_MI` times `w_EOI[e]^T`, for every expert e at once. `upcast` runs bf16
    inputs in fp32 (outputs rounded back), for CPUs without bf16 units.

    Compiled or differentiated it runs as the opaque custom op `jetmoe::grouped_mm` (which compiles for every dtype
    the device runs, where the built-in fake kernel of `torch._grouped_mm` admits only bf16); plain inference calls
    the kernel directly, without the custom op's dispatch cost."""
    w_EIO = w_EOI.transpose(-2, -1)
    needs_grad = torch.is_grad_enabled() and (x_MI.requires_grad or w_EOI.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        return _grouped_mm_op(x_MI, w_EIO, offsets_E, upcast)
    return _grouped_mm(x_MI, w_EIO, offsets_E, upcast)
