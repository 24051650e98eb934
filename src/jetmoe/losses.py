"""Losses as pure functions: language-model cross-entropy (from logits, or fused with the LM head so the
logits are never materialised) and the router auxiliary losses.

None of them synchronises with the host, so they can run inside a compiled graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are shifted inside and -100 is ignored (as transformers does).

    Computed in fp32 whatever the logits' dtype.
    """
    shifted_BT = shift_labels(labels_BT)
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), shifted_BT.flatten().to(logits_BTV.device), ignore_index=IGNORE_INDEX
    )


def _token_weights(router_logits: Sequence[torch.Tensor], mask_N: torch.Tensor | None) -> torch.Tensor:
    n_tokens = router_logits[0].shape[0]
    if mask_N is None:
        return torch.ones(n_tokens, dtype=torch.float32, device=router_logits[0].device)
    return mask_N.reshape(-1).to(device=router_logits[0].device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None, per_router: bool = False
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss E · Σ_e f_e · P_e, equal to k when routing is uniform.

    `router_logits`: one `[N, E]` tensor per router; f_e is the share of the N·k top-k assignments that go to
    expert e, P_e the mean router probability of e. Tokens with `mask_N == 0` (padding) are excluded.

    - `per_router=False` (transformers' JetMoe, exactly): f and P are averaged over every router first, then
      multiplied, so one router's imbalance can be offset by another's.
    - `per_router=True` (the JetMoE paper): the loss of each router on its own, averaged over routers; it is
      k only when every router is balanced.
    """
    num_experts = router_logits[0].shape[-1]
    w_N = _token_weights(router_logits, mask_N)
    logits_RNE = torch.stack([logits.float() for logits in router_logits])
    probs_RNE = logits_RNE.softmax(dim=-1)
    selected_RNk = logits_RNE.topk(top_k, dim=-1).indices
    assign_RNE = torch.zeros_like(probs_RNE).scatter_(-1, selected_RNk, 1.0)
    tokens = w_N.sum()
    tokens_per_expert_RE = torch.einsum("rne,n->re", assign_RNE, w_N) / tokens
    prob_per_expert_RE = torch.einsum("rne,n->re", probs_RNE, w_N) / tokens
    if per_router:
        return num_experts * torch.sum(tokens_per_expert_RE * prob_per_expert_RE, dim=-1).mean()
    return num_experts * torch.sum(tokens_per_expert_RE.mean(0) * prob_per_expert_RE.mean(0))


def router_z_loss(router_logits: Sequence[torch.Tensor], mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over routers and tokens of logsumexp(logits)^2; padding excluded."""
    w_N = _token_weights(router_logits, mask_N)
    z_RN = torch.stack([torch.logsumexp(logits.float(), dim=-1) for logits in router_logits]).square()
    return (z_RN * w_N).sum() / (w_N.sum() * len(router_logits))


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Targets of next-token prediction: position t predicts `labels[t + 1]`; the last position is ignored."""
    return F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:]


CE_CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MiB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of `h_ND @ w_VD^T` against `targets_N`, chunk by chunk of rows, in fp32; the gradients are
    computed in the same pass (the loss is a scalar) and only scaled in backward, so neither the logits nor
    their gradient ever exist in full and the LM-head GEMM is not recomputed."""

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
                    dw_VD.addmm_(probs_CV.t(), h_CD * scale_C1) if compute_dtype == torch.float32 else dw_VD.add_(
                        probs_CV.t() @ (h_CD * scale_C1)
                    )
        ctx.save_for_backward(dh_ND, None if dw_VD is None else dw_VD.to(w_VD.dtype))
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh_ND, dw_VD = ctx.saved_tensors
        dh_ND = None if dh_ND is None else dh_ND * dloss.to(dh_ND.dtype)
        dw_VD = None if dw_VD is None else dw_VD * dloss.to(dw_VD.dtype)
        return dh_ND, dw_VD, None, None, None


def linear_cross_entropy(
    h_BTD: torch.Tensor, w_VD: torch.Tensor, labels_BT: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """`causal_lm_cross_entropy(h_BTD @ w_VD^T, labels_BT)` without materialising the logits: the LM head runs
    inside, chunk by chunk of tokens, and the softmax is computed in fp32 whatever the input dtype.

    bf16 GEMMs run in fp32 where `jetmoe.model.ops.upcast_bf16` says so (CPUs without bf16 units)."""
    from jetmoe.model.ops import upcast_bf16  # the model package imports this module

    h_ND = h_BTD.flatten(0, 1)
    targets_N = shift_labels(labels_BT).flatten().to(h_ND.device)
    fp32 = h_ND.dtype == torch.float32 or upcast_bf16(h_ND.device.type, h_ND.dtype)
    compute_dtype = torch.float32 if fp32 else h_ND.dtype
    if chunk_rows is None:
        chunk_rows = max(1, CE_CHUNK_ELEMENTS // w_VD.shape[0])
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, compute_dtype, chunk_rows)
