"""Test helpers around the model: `Routing` results built from router logits alone (as `TopKRouter` builds them),
and a model made to run a given set of operations."""

from collections.abc import Sequence

import torch

from jetmoe.model import Routing


def route(logits_NE: torch.Tensor, top_k: int) -> Routing:
    top = logits_NE.topk(top_k, dim=-1)
    return Routing(logits_NE, top.indices, top.values.softmax(-1))


def routes(logits: Sequence[torch.Tensor], top_k: int) -> tuple[Routing, ...]:
    return tuple(route(logits_NE, top_k) for logits_NE in logits)


def use_ops(model, ops):
    """Make every forward of `model` (a task model) take `ops`, whatever its device and dtype."""
    for module in (model, model.model):
        module.ops_for = lambda x: ops
    return model
