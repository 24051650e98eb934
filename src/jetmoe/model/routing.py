"""Top-k routing: the router of a MoA or MoE layer and the one `Routing` result that the layer's expert computation,
the auxiliary losses and the expert statistics all read.

A router scores each token against every expert with a linear map in fp32, keeps the k best experts of the token
and gates them with a softmax over those k logits (as transformers' JetMoe). Whatever is derived from that choice
(the full softmax the load-balancing loss needs, the sort of the N·k routed rows by expert, the per-expert counts)
is computed once, the first time something asks for it, and shared by every reader.

Three options change the choice (`JetMoeConfig`: `balancing="bias"`, `capacity_factor`, `router_force_uniform`);
each is a few lines of `TopKRouter.forward` and leaves the Routing's form as it is, so the experts, the losses and
the statistics need nothing of their own: a selection bias picks the experts, a forced assignment replaces the
choice, and a dropped row keeps its place with a gate of 0.

Shape letters: N tokens, E experts, k experts per token, M = N·k routed rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class lazy:
    """A read-only attribute computed on first access and then stored on the instance (`functools.cached_property`
    without its lock, which `torch.compile` cannot trace)."""

    def __init__(self, fn) -> None:
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


class Routing:
    """The routing of N tokens to k of E experts.

    Slot `n·k + j` is token n's j-th choice (choices in descending logit order). The routed rows, sorted by expert
    (stable, so each expert's rows stay in token order), are what the experts multiply; `slot_M` and `rank_M` are
    inverse permutations between slots and sorted rows.
    """

    def __init__(
        self, logits_NE: torch.Tensor, experts_Nk: torch.Tensor, gates_Nk: torch.Tensor,
        kept_Nk: torch.Tensor | None = None,
    ) -> None:
        self.logits_NE = logits_NE  # fp32 router logits
        self.experts_Nk = experts_Nk  # chosen experts
        self.gates_Nk = gates_Nk  # softmax over each token's k chosen logits, in the activations' dtype (0: dropped)
        self.kept_Nk = kept_Nk  # with a capacity factor: False where the row was dropped; None: dropless

    def detach(self) -> "Routing":
        """The same routing with every tensor (those computed so far included) detached from autograd."""
        out = Routing.__new__(Routing)
        out.__dict__.update({name: None if value is None else value.detach() for name, value in self.__dict__.items()})
        return out

    @property
    def num_experts(self) -> int:
        return self.logits_NE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts_Nk.shape[-1]

    @lazy
    def probs_NE(self) -> torch.Tensor:
        """Full softmax over all experts (fp32): the router probabilities of the load-balancing loss."""
        return self.logits_NE.softmax(dim=-1)

    @lazy
    def slot_M(self) -> torch.Tensor:
        """The slot of each sorted row."""
        return self.experts_Nk.flatten().argsort(stable=True)

    @lazy
    def rank_M(self) -> torch.Tensor:
        """The sorted row of each slot (the inverse permutation of `slot_M`)."""
        rows_M = torch.arange(self.slot_M.shape[0], device=self.slot_M.device)
        return torch.empty_like(self.slot_M).scatter_(0, self.slot_M, rows_M)

    @property
    def rank_Nk(self) -> torch.Tensor:
        return self.rank_M.view(-1, self.top_k)

    @lazy
    def token_M(self) -> torch.Tensor:
        """The token of each sorted row."""
        return torch.div(self.slot_M, self.top_k, rounding_mode="floor")

    @lazy
    def gates_M(self) -> torch.Tensor:
        """The gate of each sorted row."""
        return self.gates_Nk.flatten()[self.slot_M]

    @lazy
    def counts_E(self) -> torch.Tensor:
        """Routed rows per expert (int64; a scatter-add, not `bincount`, so the shape is static when compiled)."""
        experts_M = self.experts_Nk.flatten()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=experts_M.device)
        return counts_E.scatter_add_(0, experts_M, torch.ones_like(experts_M))

    @lazy
    def offsets_E(self) -> torch.Tensor:
        """The end of each expert's sorted rows (int32, the grouped GEMM's convention)."""
        return self.counts_E.cumsum(0).to(torch.int32)

    def expert_sums(self, weight_N: torch.Tensor | None = None, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert, the (weighted) number of routed rows and the (weighted) sum of router probabilities, both
        `[E]` fp32; `weight_N` is 1 for tokens to count and 0 for padding (default: every token counts). Divided by
        the weight total they are the shares f (summing to k) and P (summing to 1) of the load-balancing loss.
        With `groups` G, the same per group of N / G consecutive tokens (the rows of a batch), `[G, E]` each."""
        if weight_N is None:
            weight_N = torch.ones(self.experts_Nk.shape[0], dtype=torch.float32, device=self.experts_Nk.device)
        weight_GS = weight_N.view(groups, -1)  # S tokens per group
        experts_GM = self.experts_Nk.view(groups, -1)
        assigned_GE = torch.zeros(groups, self.num_experts, dtype=torch.float32, device=experts_GM.device)
        assigned_GE = assigned_GE.scatter_add_(1, experts_GM, weight_GS.repeat_interleave(self.top_k, dim=1))
        probs_GE = (weight_GS.unsqueeze(1) @ self.probs_NE.view(groups, -1, self.num_experts)).squeeze(1)
        if groups == 1:
            return assigned_GE[0], probs_GE[0]
        return assigned_GE, probs_GE

    @property
    def dropped_share(self) -> torch.Tensor:
        """The share of the routed rows dropped for capacity (0-dim fp32; 0 when dropless)."""
        if self.kept_Nk is None:
            return torch.zeros((), device=self.experts_Nk.device)
        return 1.0 - self.kept_Nk.float().mean()


class TopKRouter(nn.Module):
    """Linear router in fp32 (whatever the activations' dtype); softmax over the top-k logits gives the gates.

    Options (see `JetMoeConfig`): `selection_bias` keeps a per-expert bias (the buffer `expert_bias`, fp32, saved
    with the weights) that is added to the logits for the choice of experts only and moved by `update_bias`, not by
    gradients; `capacity_factor` drops, while training, the rows past each expert's capacity; `force_uniform`
    assigns experts round robin whatever the logits."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, selection_bias: bool = False,
        capacity_factor: float | None = None, force_uniform: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.force_uniform = capacity_factor, force_uniform
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)  # HF key: router.layer.weight
        self.expert_bias: torch.Tensor | None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if selection_bias else None)

    def reset_buffers(self) -> None:
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.layer.weight.float())
        if self.force_uniform:
            slots_Nk = torch.arange(logits_NE.shape[0] * self.top_k, device=logits_NE.device).view(-1, self.top_k)
            experts_Nk = slots_Nk % self.num_experts  # distinct within a token since k <= E
            top_logits_Nk = logits_NE.gather(-1, experts_Nk)
        elif self.expert_bias is not None:
            experts_Nk = (logits_NE + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
            top_logits_Nk = logits_NE.gather(-1, experts_Nk)
        else:
            top_logits_Nk, experts_Nk = logits_NE.topk(self.top_k, dim=-1)
        gates_Nk = top_logits_Nk.softmax(dim=-1)
        kept_Nk = None
        if self.capacity_factor is not None and self.training:
            capacity = math.ceil(self.capacity_factor * experts_Nk.numel() / self.num_experts)
            kept_Nk = within_capacity(experts_Nk, self.num_experts, capacity)
            gates_Nk = gates_Nk * kept_Nk
        return Routing(logits_NE, experts_Nk, gates_Nk.to(x_ND.dtype), kept_Nk)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of the experts loaded below the mean by
        `rate`, lower the others' by `rate`; `load_E` is the routed rows per expert since the last update."""
        load_E = load_E.float()
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E).to(self.expert_bias.dtype)


def within_capacity(experts_Nk: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """`[N, k]` bool: whether each routed row is among the first `capacity` rows of its expert, counting every
    token's first choice (in token order) before any second choice (GShard's priority). No host synchronisation."""
    experts_M = experts_Nk.t().flatten()  # priority order: choice j major, token minor
    sort_M = experts_M.argsort(stable=True)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=experts_M.device)
    counts_E = counts_E.scatter_add_(0, experts_M, torch.ones_like(experts_M))
    starts_E = counts_E.cumsum(0) - counts_E
    rows_M = torch.arange(experts_M.shape[0], device=experts_M.device)
    position_M = torch.empty_like(rows_M).scatter_(0, sort_M, rows_M - starts_E[experts_M[sort_M]])
    return (position_M < capacity).view(experts_Nk.shape[1], -1).t()
