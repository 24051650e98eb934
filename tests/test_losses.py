import math

import pytest
import torch

from jetmoe.losses import causal_lm_cross_entropy, load_balancing_loss, router_z_loss


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
    loss = causal_lm_cross_entropy(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32


def test_uniform_routing_gives_k():
    logits = [torch.zeros(16, 4) + torch.arange(16)[:, None].eq(torch.arange(4)).float() * 0 for _ in range(3)]
    # Equal logits: probabilities 1/E each; top-k ties pick fixed experts, so use a balanced assignment instead.
    balanced = torch.eye(4).repeat(4, 1) * 1e-3  # each expert first choice for 4 of 16 tokens
    assert math.isclose(load_balancing_loss([balanced] * 3, top_k=1).item(), 1.0, rel_tol=1e-3)
    assert logits[0].shape == (16, 4)


def test_collapsed_routing_is_penalised():
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(32, 1)
    balanced = torch.eye(4).repeat(8, 1) * 10
    assert load_balancing_loss([collapsed], top_k=1) > 3.5  # ~E when everything goes to one expert
    assert load_balancing_loss([balanced], top_k=1) < 1.01


def test_mask_excludes_padding():
    logits = torch.randn(6, 4)
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    torch.testing.assert_close(load_balancing_loss([logits], 2, mask), load_balancing_loss([logits[:3]], 2))
    torch.testing.assert_close(router_z_loss([logits], mask), router_z_loss([logits[:3]]))


def test_z_loss_value():
    logits = torch.randn(5, 3)
    torch.testing.assert_close(router_z_loss([logits]), torch.logsumexp(logits, -1).square().mean())


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_transformers_function(top_k):
    mixtral = pytest.importorskip("transformers.models.jetmoe.modeling_jetmoe")
    logits = tuple(torch.randn(20, 6) for _ in range(4))
    mask = torch.randint(0, 2, (4, 5))
    for m in (None, mask):
        ours = load_balancing_loss(logits, top_k, m)
        theirs = mixtral.load_balancing_loss_func(logits, 6, top_k, m)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_per_router_balance_sees_offsetting_imbalance():
    # Two routers collapsed onto different experts: averaged over routers first (transformers) they look
    # half balanced; per router (the JetMoE paper) each is fully collapsed.
    to_0 = torch.tensor([[10.0, 0.0]]).repeat(8, 1)
    to_1 = torch.tensor([[0.0, 10.0]]).repeat(8, 1)
    assert load_balancing_loss([to_0, to_1], top_k=1) < 1.01
    assert load_balancing_loss([to_0, to_1], top_k=1, per_router=True) > 1.99  # ~E
    # One router: the two definitions agree; per router is the mean of each router's own loss.
    logits = [torch.randn(12, 4) for _ in range(3)]
    mask = torch.tensor([1] * 9 + [0] * 3)
    torch.testing.assert_close(load_balancing_loss(logits[:1], 2, mask), load_balancing_loss(logits[:1], 2, mask, True))
    mean_of_each = torch.stack([load_balancing_loss([each], 2, mask) for each in logits]).mean()
    torch.testing.assert_close(load_balancing_loss(logits, 2, mask, per_router=True), mean_of_each)
