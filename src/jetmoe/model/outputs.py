"""Model outputs with transformers' field names (attribute access, `out["name"]`, `to_tuple()`), plus the fields
jetmoe adds: each router's `Routing`, and the loss split into its terms."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from jetmoe.model.cache import KVCache
from jetmoe.model.routing import Routing


class ModelOutput:
    """Attribute access plus `out["name"]` and `to_tuple()` (non-None fields), like transformers' outputs."""

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routings: tuple[Routing, ...] | None = None  # every router's choice, order (layer 0 MoA, layer 0 MoE, ...)


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ce_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routings: tuple[Routing, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
