"""The pure loss functions: cross-entropy, load balancing (transformers' definition and the paper's per-router
one) and the router z-loss."""

import math

import pytest
import torch

from jetmoe.losses import causal_lm_cross_entropy, load_balancing_loss, load_balancing_per_router, router_z_loss
from jetmoe.model.model import router_losses
from jetmoe.model.routing import Routing


def _routings(logits_list, top_k):
    return tuple(Routing(logits, *reversed(logits.topk(top_k, -1))) for logits in logits_list)


def _shares(logits_list, top_k, weight=None):
    """(tokens_RE, probs_RE) as the model computes them: `Routing.expert_sums` over the tokens of weight 1."""
    sums = [r.expert_sums(weight) for r in _routings(logits_list, top_k)]
    tokens = logits_list[0].shape[0] if weight is None else weight.sum()
    return torch.stack([s[0] for s in sums]) / tokens, torch.stack([s[1] for s in sums]) / tokens


def test_cross_entropy_shifts_and_ignores():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 2] = -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(causal_lm_cross_entropy(logits, labels), expected)


def test_cross_entropy_is_fp32_for_bf16_logits():
    logits = torch.randn(1, 4, 11)
    labels = torch.randint(0, 11, (1, 4))
    assert causal_lm_cross_entropy(logits.bfloat16(), labels).dtype == torch.float32


def test_balanced_routing_gives_k_and_collapsed_routing_e():
    balanced = torch.eye(4).repeat(4, 1) * 10  # each expert first choice of 4 of 16 tokens
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(16, 1)
    assert math.isclose(load_balancing_loss(*_shares([balanced] * 3, 1)).item(), 1.0, rel_tol=1e-3)
    assert load_balancing_loss(*_shares([collapsed], 1)) > 3.9  # ~E when everything goes to one expert
    tokens, probs = torch.full((1, 4), 2 / 4), torch.full((1, 4), 1 / 4)  # top-2, perfectly spread
    assert math.isclose(load_balancing_loss(tokens, probs).item(), 2.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_transformers_function(top_k):
    jetmoe_hf = pytest.importorskip("transformers.models.jetmoe.modeling_jetmoe")
    logits = tuple(torch.randn(20, 6) for _ in range(4))
    mask = torch.randint(0, 2, (4, 5))
    for m in (None, mask):
        weight = None if m is None else m.flatten().float()
        ours = load_balancing_loss(*_shares(logits, top_k, weight))
        theirs = jetmoe_hf.load_balancing_loss_func(logits, 6, top_k, m)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(router_losses(_routings(logits, top_k), weight, "aux_global", batch_size=4)[0], theirs)


def test_padding_is_left_out():
    logits = torch.randn(6, 4)
    weight = torch.tensor([1.0, 1, 1, 0, 0, 0])
    torch.testing.assert_close(load_balancing_loss(*_shares([logits], 2, weight)),
                               load_balancing_loss(*_shares([logits[:3]], 2)))
    torch.testing.assert_close(router_z_loss(logits[None], weight), router_z_loss(logits[None, :3]))


def test_z_loss_value():
    logits = torch.randn(2, 5, 3)
    torch.testing.assert_close(router_z_loss(logits), torch.logsumexp(logits, -1).square().mean())


def test_per_router_balance_sees_offsetting_imbalance():
    # Two routers collapsed onto different experts: averaged over routers first (transformers) they look
    # half balanced; per router (the JetMoE paper) each is fully collapsed.
    to_0 = torch.tensor([[10.0, 0.0]]).repeat(8, 1)
    to_1 = torch.tensor([[0.0, 10.0]]).repeat(8, 1)
    shares = _shares([to_0, to_1], 1)
    assert load_balancing_loss(*shares) < 1.01
    assert load_balancing_loss(*shares, per_router=True) > 1.99  # ~E
    # Per router is the mean of each router's own loss; with one router the two definitions agree.
    tokens, probs = _shares([torch.randn(12, 4) for _ in range(3)], 2)
    each = load_balancing_per_router(tokens, probs)
    assert each.shape == (3,)
    torch.testing.assert_close(load_balancing_loss(tokens, probs, per_router=True), each.mean())
    torch.testing.assert_close(load_balancing_loss(tokens[:1], probs[:1]), each[0])
