"""Expert-utilization statistics for JetMoE routers (MoA and MoE, one top-k router each per layer).

Inputs are the `jetmoe.model.Routing` results the model already returns (`out.routings`: the chosen experts and
the router probabilities, computed once by the router and shared with the auxiliary losses), R = 2·L of them ordered
(layer0 MoA, layer0 MoE, layer1 MoA, ...), plus an optional token mask ``[N]``.

Definitions (per router, over the tokens seen since the last reset):

* ``load[e]``    share of top-k assignments that went to expert e (sums to 1; uniform = 1/E).
* ``prob[e]``    mean full-softmax router probability of expert e.
* ``imbalance``  max(load) / mean(load) = E * max(load); 1 = balanced, E/k = fully collapsed.
* ``cv``         coefficient of variation std(load) / mean(load) (population std); 0 = balanced.
* ``entropy``    mean per-token entropy of the full softmax (nats); ``entropy_norm`` = entropy / log E.
  With E = 1 the only distribution is uniform, so ``entropy_norm`` is defined as 1.
* ``dead_fraction``  fraction of experts with ``load < dead_threshold / E``, i.e. receiving less
  than ``dead_threshold`` times their balanced share (default 10 %).
* ``top1_top2_ratio``  mean over tokens of p_top2 / p_top1 (full-softmax probabilities): how
  decisive the router is; 1 = the two best experts weighted equally, -> 0 = decisive. It always
  uses the second-largest probability, also for k = 1; with E = 1 there is no second expert and it is 0.
* ``balance_loss``  the router's own load-balancing loss (`jetmoe.losses.load_balancing_per_router` of its token
  and probability shares): k for perfectly balanced routing, as in training.
* ``dropped_share``  share of the routed rows dropped for capacity (``JetMoeConfig.capacity_factor``; 0 when
  dropless). ``load`` counts the rows as routed, before dropping.

With no tokens, every statistic is 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchmetrics
from torch import Tensor

from jetmoe.losses import load_balancing_per_router
from jetmoe.model import Routing

ROUTER_KINDS = ("moa", "moe")
SUMMARY_KEYS = (
    "imbalance",
    "cv",
    "entropy",
    "entropy_norm",
    "dead_fraction",
    "top1_top2_ratio",
    "top1_prob",
    "top2_prob",
    "balance_loss",
    "dropped_share",
)

# name -> (shape of the state: "RE" or "R", dtype); counts are exact ints, probability sums fp64.
_STATES = {
    "topk_count_RE": ("RE", torch.int64),
    "top1_count_RE": ("RE", torch.int64),
    "prob_sum_RE": ("RE", torch.float64),
    "tokens_R": ("R", torch.int64),
    "entropy_sum_R": ("R", torch.float64),
    "top1_prob_sum_R": ("R", torch.float64),
    "top2_prob_sum_R": ("R", torch.float64),
    "ratio_sum_R": ("R", torch.float64),
    "dropped_count_R": ("R", torch.int64),
}


ROUTER_LABELS = {"moa": "MoA", "moe": "MoE"}


def router_names(num_layers: int) -> list[str]:
    """``["moa/layer_0", "moe/layer_0", "moa/layer_1", ...]``, the order of the model's routings."""
    return [f"{kind}/layer_{layer}" for layer in range(num_layers) for kind in ROUTER_KINDS]


def loads_by_kind(load_xRE: np.ndarray) -> dict[str, np.ndarray]:
    """``{"MoA": [..., L, E], "MoE": [..., L, E]}`` from per-router values ``[..., R, E]`` in ``router_names`` order."""
    load_xRE = np.asarray(load_xRE)
    return {ROUTER_LABELS[kind]: load_xRE[..., k::len(ROUTER_KINDS), :] for k, kind in enumerate(ROUTER_KINDS)}


def routing_sums(routings: Sequence[Routing], mask_N: Tensor | None = None) -> dict[str, Tensor]:
    """Per-router sums over the (unmasked) tokens of one batch; keys as in ``_STATES``. No host sync."""
    first = routings[0]
    num_tokens, num_experts = first.logits_NE.shape
    device = first.logits_NE.device
    if mask_N is None:
        mask_N = torch.ones(num_tokens, dtype=torch.bool, device=device)
    weight_N = mask_N.reshape(-1).to(device=device, dtype=torch.float32)
    assigned, prob_sums = zip(*(routing.expert_sums(weight_N) for routing in routings))
    probs_RNE = torch.stack([routing.probs_NE for routing in routings])
    experts_RNk = torch.stack([routing.experts_Nk for routing in routings])
    entropy_RN = -torch.special.xlogy(probs_RNE, probs_RNE).sum(-1)
    if first.top_k >= 2 or num_experts == 1:  # the two best are the first two chosen (descending order)
        top_p_RNk = probs_RNE.gather(-1, experts_RNk[..., :2])
    else:
        top_p_RNk = probs_RNE.topk(2, dim=-1).values
    top1_p_RN = top_p_RNk[..., 0]
    top2_p_RN = top_p_RNk[..., 1] if num_experts > 1 else torch.zeros_like(top1_p_RN)
    top1_RE = torch.zeros(len(routings), num_experts, device=device).scatter_add_(
        1, experts_RNk[..., 0], weight_N.expand(len(routings), -1)
    )
    dropped_R = torch.stack([
        torch.zeros((), device=device) if routing.kept_Nk is None else (~routing.kept_Nk).sum(-1).float() @ weight_N
        for routing in routings
    ])
    return {
        "topk_count_RE": torch.stack(assigned).round().long(),
        "top1_count_RE": top1_RE.round().long(),
        "prob_sum_RE": torch.stack(prob_sums).double(),
        "tokens_R": mask_N.long().sum().expand(len(routings)),
        "entropy_sum_R": entropy_RN @ weight_N,
        "top1_prob_sum_R": top1_p_RN @ weight_N,
        "top2_prob_sum_R": top2_p_RN @ weight_N,
        "ratio_sum_R": (top2_p_RN / top1_p_RN) @ weight_N,
        "dropped_count_R": dropped_R.round().long(),
    }


def utilization_stats(sums: dict[str, Tensor], top_k: int, dead_threshold: float = 0.1) -> dict[str, Tensor]:
    """Turn accumulated ``routing_sums`` into the statistics described in the module docstring."""
    tokens_R = sums["tokens_R"]
    num_experts = sums["topk_count_RE"].shape[-1]
    has_tokens_R = tokens_R > 0
    denom_R1 = tokens_R.clamp_min(1).double()[:, None]

    load_RE = sums["topk_count_RE"] / (top_k * denom_R1)
    prob_RE = sums["prob_sum_RE"] / denom_R1
    entropy_R = sums["entropy_sum_R"] / denom_R1[:, 0]
    if num_experts > 1:
        entropy_norm_R = entropy_R / math.log(num_experts)
    else:
        entropy_norm_R = has_tokens_R.double()
    dead_RE = (load_RE < dead_threshold / num_experts) & has_tokens_R[:, None]
    stats = {
        "load": load_RE,
        "top1_load": sums["top1_count_RE"] / denom_R1,
        "prob": prob_RE,
        "imbalance": num_experts * load_RE.amax(-1),
        "cv": num_experts * load_RE.std(-1, correction=0),
        "entropy": entropy_R,
        "entropy_norm": entropy_norm_R,
        "dead_fraction": dead_RE.double().mean(-1),
        "top1_top2_ratio": sums["ratio_sum_R"] / denom_R1[:, 0],
        "top1_prob": sums["top1_prob_sum_R"] / denom_R1[:, 0],
        "top2_prob": sums["top2_prob_sum_R"] / denom_R1[:, 0],
        "balance_loss": load_balancing_per_router(top_k * load_RE, prob_RE),
        "dropped_share": sums["dropped_count_R"] / (top_k * denom_R1[:, 0]),
    }
    stats = {name: value.float() for name, value in stats.items()}
    stats["tokens"] = sums["topk_count_RE"].clone()
    stats["num_tokens"] = tokens_R.clone()
    return stats


class RouterUtilization(torchmetrics.Metric):
    """Accumulates routing statistics of R routers with E experts and top-k routing.

    All states are sums (``dist_reduce_fx="sum"``), so under DDP/FSDP ``compute()`` reports global
    numbers; like every torchmetrics sync it is a collective, so every rank must call it.
    An expert is *dead* when its load share is below ``dead_threshold * (1 / E)``.
    ``compute()`` returns the dict of ``utilization_stats`` (``[R, E]`` and ``[R]`` tensors; note that
    torchmetrics squeezes single-element results, so with R = 1 the ``[R]`` entries are 0-dim).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_routers: int, num_experts: int, top_k: int, dead_threshold: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_routers, self.num_experts, self.top_k = num_routers, num_experts, top_k
        self.dead_threshold = dead_threshold
        for name, (shape, dtype) in _STATES.items():
            size = (num_routers, num_experts) if shape == "RE" else (num_routers,)
            self.add_state(name, default=torch.zeros(size, dtype=dtype), dist_reduce_fx="sum")

    def update(self, routings: Sequence[Routing], mask: Tensor | None = None) -> None:
        """Add one batch: R routings of N tokens; ``mask`` ``[N]`` is True for real tokens."""
        if len(routings) != self.num_routers:
            raise ValueError(f"expected {self.num_routers} routings, got {len(routings)}")
        for name, value in routing_sums(routings, mask).items():
            # out of place: under ddp_spawn on CPU the states arrive in memory shared by all ranks
            state = getattr(self, name)
            setattr(self, name, state + value.to(state.dtype))

    def merge_state(self, incoming_state: dict[str, Tensor] | RouterUtilization) -> None:
        """Add another metric's (local) sums, e.g. fold a finished window into a run total.

        Unlike the base class, this also marks the metric updated and drops a cached ``compute()``.
        """
        super().merge_state(incoming_state)
        self._update_count += 1
        self._computed = None

    def compute(self) -> dict[str, Tensor]:
        return utilization_stats(
            {name: getattr(self, name) for name in _STATES}, self.top_k, self.dead_threshold
        )
