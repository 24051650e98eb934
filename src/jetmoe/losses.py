"""Losses as pure functions: language-model cross-entropy and the router auxiliary losses.

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
    shifted_BT = F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), shifted_BT.flatten().to(logits_BTV.device), ignore_index=IGNORE_INDEX
    )


def _token_weights(router_logits: Sequence[torch.Tensor], mask_N: torch.Tensor | None) -> torch.Tensor:
    n_tokens = router_logits[0].shape[0]
    if mask_N is None:
        return torch.ones(n_tokens, dtype=torch.float32, device=router_logits[0].device)
    return mask_N.reshape(-1).to(device=router_logits[0].device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss over all routers, exactly as `transformers` computes it for JetMoe.

    `router_logits`: one `[N, E]` tensor per router. The token fraction f_e (share of the N·k top-k assignments
    that go to expert e) and the mean router probability P_e are averaged over every router first; the loss is
    E · Σ_e f_e · P_e, equal to k when routing is uniform. Tokens with `mask_N == 0` (padding) are excluded.
    """
    num_experts = router_logits[0].shape[-1]
    w_N = _token_weights(router_logits, mask_N)
    logits_RNE = torch.stack([logits.float() for logits in router_logits])
    probs_RNE = logits_RNE.softmax(dim=-1)
    selected_RNk = logits_RNE.topk(top_k, dim=-1).indices
    assign_RNE = torch.zeros_like(probs_RNE).scatter_(-1, selected_RNk, 1.0)
    rows = w_N.sum() * len(router_logits)
    tokens_per_expert_E = torch.einsum("rne,n->e", assign_RNE, w_N) / rows
    prob_per_expert_E = torch.einsum("rne,n->e", probs_RNE, w_N) / rows
    return num_experts * torch.sum(tokens_per_expert_E * prob_per_expert_E)


def router_z_loss(router_logits: Sequence[torch.Tensor], mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over routers and tokens of logsumexp(logits)^2; padding excluded."""
    w_N = _token_weights(router_logits, mask_N)
    z_RN = torch.stack([torch.logsumexp(logits.float(), dim=-1) for logits in router_logits]).square()
    return (z_RN * w_N).sum() / (w_N.sum() * len(router_logits))
