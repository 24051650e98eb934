"""The LM head fused with the cross-entropy: `causal_lm_cross_entropy(h @ w^T, labels)` without the logits.

Chunk by chunk of tokens, the logits of a chunk are computed, turned into the loss and into the gradients of the
hidden states and the head's weight in the same pass (the loss is a scalar, so backward only scales them): neither
the `[B, T, V]` logits nor their gradient ever exist in full, and the LM-head GEMM is not recomputed.
"""

from __future__ import annotations

import torch

from jetmoe.losses import IGNORE_INDEX, shift_labels

CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MiB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of `h_ND @ w_VD^T` against `targets_N`, in fp32, chunk by chunk of rows."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, compute_dtype, chunk_rows):
        N, V = h_ND.shape[0], w_VD.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid_N = targets_N != IGNORE_INDEX
        scale_N = valid_N / valid_N.sum()  # mean over the counted targets (nan when none counts, like F.cross_entropy)
        safe_targets_N = targets_N.clamp(min=0)
        w_VD32 = w_VD.to(compute_dtype)
        dh_ND = torch.empty_like(h_ND) if need_dh else None
        dw_VD = torch.zeros(V, h_ND.shape[1], dtype=torch.float32, device=h_ND.device) if need_dw else None
        logits_buf = torch.empty(min(chunk_rows, N), V, dtype=torch.float32, device=h_ND.device)
        probs_buf = torch.empty_like(logits_buf)
        loss = h_ND.new_zeros((), dtype=torch.float32)
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            n = rows.stop - rows.start
            h_CD = h_ND[rows].to(compute_dtype)
            if compute_dtype == torch.float32:
                logits_CV = torch.mm(h_CD, w_VD32.t(), out=logits_buf[:n])
            else:
                logits_CV = logits_buf[:n].copy_(h_CD @ w_VD32.t())
            # One softmax pass (cheaper than log_softmax, then exp); the log-sum-exp from the largest logit and its
            # probability, which is at least 1/V, so its log is exact to rounding.
            probs_CV = torch.softmax(logits_CV, dim=-1, out=probs_buf[:n])
            lse_C = logits_CV.amax(-1) - probs_CV.amax(-1).log()
            target_C1 = safe_targets_N[rows, None]
            loss = loss - ((logits_CV.gather(1, target_C1).squeeze(1) - lse_C) * scale_N[rows]).sum()
            if need_dh or need_dw:
                # d loss / d logits = scale * (softmax - onehot); the scale is folded into the [C, D] operands.
                probs_CV = probs_CV.scatter_add_(1, target_C1, torch.full_like(probs_CV[:, :1], -1.0))
                probs_CV = probs_CV.to(compute_dtype)
                scale_C1 = scale_N[rows, None].to(compute_dtype)
                if need_dh:
                    dh_ND[rows] = (probs_CV @ w_VD32).mul_(scale_C1)
                if need_dw:  # accumulated in fp32 (a bf16 product is added without an fp32 copy)
                    if compute_dtype == torch.float32:
                        dw_VD.addmm_(probs_CV.t(), h_CD * scale_C1)
                    else:
                        dw_VD.add_(probs_CV.t() @ (h_CD * scale_C1))
        ctx.save_for_backward(dh_ND, None if dw_VD is None else dw_VD.to(w_VD.dtype))
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh_ND, dw_VD = ctx.saved_tensors
        dh_ND = None if dh_ND is None else dh_ND * dloss.to(dh_ND.dtype)
        dw_VD = None if dw_VD is None else dw_VD * dloss.to(dw_VD.dtype)
        return dh_ND, dw_VD, None, None, None


def linear_cross_entropy(
    h_BTD: torch.Tensor, w_VD: torch.Tensor, labels_BT: torch.Tensor, *, compute_dtype: torch.dtype | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits `h_BTD @ w_VD^T` against `labels_BT` (shifted inside, -100
    ignored), in fp32. The head's products run in `compute_dtype` (default: the inputs' dtype)."""
    h_ND = h_BTD.flatten(0, 1)
    targets_N = shift_labels(labels_BT).flatten().to(h_ND.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // w_VD.shape[0])
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, compute_dtype or h_ND.dtype, chunk_rows)
