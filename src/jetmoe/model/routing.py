"""Top-k routing: the router of a MoA or MoE layer and the one `Routing` result that the layer's expert computation,
the auxiliary losses and the expert statistics all read.

A router scores each token against every expert with a linear map in fp32, keeps the k best experts of the token
and gates them with a softmax over those k logits (as transformers' JetMoe). Whatever is derived from that choice
(the full softmax the load-balancing loss needs, the sort of the N·k routed rows by expert, the per-expert counts)
is computed once, the first time something asks for it, and shared by every reader.

Shape letters: N tokens, E experts, k experts per token, M = N·k routed rows.
"""

from __future__ import annotations

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

    def __init__(self, logits_NE: torch.Tensor, experts_Nk: torch.Tensor, gates_Nk: torch.Tensor) -> None:
        self.logits_NE = logits_NE  # fp32 router logits
        self.experts_Nk = experts_Nk  # chosen experts
        self.gates_Nk = gates_Nk  # softmax over each token's k chosen logits, in the activations' dtype

    def detach(self) -> "Routing":
        """The same routing with every tensor (those computed so far included) detached from autograd."""
        out = Routing.__new__(Routing)
        out.__dict__.update({name: value.detach() for name, value in self.__dict__.items()})
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

    def expert_sums(self, weight_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert, the (weighted) number of routed rows and the (weighted) sum of router probabilities, both
        `[E]` fp32; `weight_N` is 1 for tokens to count and 0 for padding (default: every token counts). Divided by
        the weight total they are the shares f (summing to k) and P (summing to 1) of the load-balancing loss."""
        experts_M = self.experts_Nk.flatten()
        if weight_N is None:
            weight_N = torch.ones(self.experts_Nk.shape[0], dtype=torch.float32, device=experts_M.device)
        assigned_E = torch.zeros(self.num_experts, dtype=torch.float32, device=experts_M.device)
        assigned_E = assigned_E.scatter_add_(0, experts_M, weight_N.repeat_interleave(self.top_k))
        return assigned_E, weight_N @ self.probs_NE


class TopKRouter(nn.Module):
    """Linear router in fp32 (whatever the activations' dtype); softmax over the top-k logits gives the gates."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)  # HF key: router.layer.weight

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.layer.weight.float())
        top_logits_Nk, experts_Nk = logits_NE.topk(self.top_k, dim=-1)
        return Routing(logits_NE, experts_Nk, top_logits_Nk.softmax(dim=-1).to(x_ND.dtype))
