"""Losses as pure functions of tensors: the language-model cross-entropy and the routers' auxiliary losses.

None of them synchronises with the host, so they run inside a compiled graph. The fused form of the
cross-entropy (LM head and loss in one chunked pass) is `jetmoe.kernels.cross_entropy.linear_cross_entropy`.

Shape letters: B batch, T positions, V vocabulary, R routers, N tokens, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Targets of next-token prediction: position t predicts `labels[t + 1]`; the last position is ignored."""
    return F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:]


def causal_lm_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; labels are shifted inside and -100 is ignored (as transformers)."""
    targets_BT = shift_labels(labels_BT).to(logits_BTV.device)
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)


def load_balancing_loss(tokens_RE: torch.Tensor, probs_RE: torch.Tensor, per_router: bool = False) -> torch.Tensor:
    """Switch/Mixtral load balancing `E · Σ_e f_e · P_e`, k when routing is uniform.

    `tokens_RE[r, e]` is the share of router r's tokens routed to expert e (each token counted k times, so a row
    sums to k) and `probs_RE[r, e]` the mean router probability of e (a row sums to 1).

    - `per_router=False` (transformers' JetMoe, exactly): f and P are averaged over the routers first, then
      multiplied, so one router's imbalance can be offset by another's.
    - `per_router=True` (the JetMoE paper): each router's loss on its own, averaged over routers; it is k only
      when every router is balanced.
    """
    if per_router:
        return load_balancing_per_router(tokens_RE, probs_RE).mean()
    return load_balancing_per_router(tokens_RE.mean(0, keepdim=True), probs_RE.mean(0, keepdim=True))[0]


def load_balancing_per_router(tokens_RE: torch.Tensor, probs_RE: torch.Tensor) -> torch.Tensor:
    """`[R]`: each router's own `E · Σ_e f_e · P_e` (see `load_balancing_loss`); any leading shape works, e.g.
    `[R, B, E]` shares of each sequence for DeepSeek-V3's sequence-wise loss (`JetMoeConfig.balancing="bias"`)."""
    return tokens_RE.shape[-1] * (tokens_RE * probs_RE).sum(-1)


def router_z_loss(logits_RNE: torch.Tensor, weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over routers and tokens of `logsumexp(logits)²`, in fp32; tokens of weight 0
    (padding) are left out."""
    z_RN = torch.logsumexp(logits_RNE.float(), dim=-1).square()
    if weight_N is None:
        return z_RN.mean()
    return (z_RN * weight_N).sum() / (weight_N.sum() * z_RN.shape[0])
