"""The router and its `Routing`: the sort of routed rows, the shares the losses and statistics read, detaching."""

import torch
import torch.nn.functional as F

from jetmoe.model.routing import TopKRouter


def test_router_picks_the_top_k_logits_in_fp32_and_gates_them():
    router = TopKRouter(16, 5, 2).bfloat16()
    routing = router(torch.randn(7, 16).bfloat16())
    assert routing.logits_NE.dtype == torch.float32 and routing.gates_Nk.dtype == torch.bfloat16
    top = routing.logits_NE.topk(2, dim=-1)
    assert torch.equal(routing.experts_Nk, top.indices)
    torch.testing.assert_close(routing.gates_Nk, top.values.softmax(-1).bfloat16())


def test_rows_are_sorted_by_expert_and_complete():
    routing = TopKRouter(16, 5, 2)(torch.randn(50, 16))
    experts_M = routing.experts_Nk.flatten()[routing.slot_M]
    assert torch.all(experts_M[1:] >= experts_M[:-1])  # rows grouped by expert
    assert routing.counts_E.sum() == 100 and routing.offsets_E[-1] == 100
    assert torch.equal(routing.counts_E, torch.bincount(routing.experts_Nk.flatten(), minlength=5))
    assert torch.equal(routing.slot_M.sort().values, torch.arange(100))  # every (token, slot) once
    assert torch.equal(routing.slot_M[routing.rank_M], torch.arange(100))  # inverse permutations
    assert torch.equal(routing.token_M, routing.slot_M // 2)
    torch.testing.assert_close(routing.gates_M, routing.gates_Nk.flatten()[routing.slot_M])


def test_expert_sums_are_the_weighted_shares():
    routing = TopKRouter(16, 4, 2)(torch.randn(10, 16))
    weight = (torch.arange(10) < 7).float()  # the last 3 tokens are padding
    assigned, probs = routing.expert_sums(weight)
    one_hot = F.one_hot(routing.experts_Nk, 4).sum(1).float()
    torch.testing.assert_close(assigned, one_hot[:7].sum(0))
    torch.testing.assert_close(probs, routing.logits_NE.softmax(-1)[:7].sum(0))
    assert assigned.sum() == 14 and torch.isclose(probs.sum(), torch.tensor(7.0))
    all_assigned, _ = routing.expert_sums()
    torch.testing.assert_close(all_assigned, one_hot.sum(0))


def test_detach_keeps_what_was_computed():
    router = TopKRouter(8, 4, 2)
    routing = router(torch.randn(6, 8))
    routing.probs_NE, routing.slot_M  # computed before detaching
    detached = routing.detach()
    assert routing.logits_NE.requires_grad and not detached.logits_NE.requires_grad
    assert "probs_NE" in detached.__dict__ and not detached.probs_NE.requires_grad
    assert torch.equal(detached.counts_E, routing.counts_E)  # computed afterwards, from the detached tensors


def test_selection_bias_picks_the_experts_but_not_the_gates():
    router = TopKRouter(16, 4, 2, selection_bias=True)
    x = torch.randn(9, 16)
    unbiased = router(x)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # expert 3 wins every token's first choice
    routing = router(x)
    assert torch.all(routing.experts_Nk[:, 0] == 3)
    torch.testing.assert_close(routing.logits_NE, unbiased.logits_NE)  # the statistics see the logits as they are
    torch.testing.assert_close(routing.gates_Nk, routing.logits_NE.gather(-1, routing.experts_Nk).softmax(-1))


def test_update_bias_moves_towards_the_mean_load():
    router = TopKRouter(8, 4, 2, selection_bias=True)
    router.update_bias(torch.tensor([10, 2, 4, 4]), rate=0.5)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    router.update_bias(torch.tensor([5, 5, 5, 5]), rate=0.5)  # balanced: sign(0) = 0, nothing moves
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    assert TopKRouter(8, 4, 2).expert_bias is None and "expert_bias" not in TopKRouter(8, 4, 2).state_dict()


def test_capacity_drops_rows_past_each_expert_first_choices_first():
    router = TopKRouter(16, 4, 2, capacity_factor=0.5).train()
    router.layer.weight.data.zero_()
    router.layer.weight.data[0, 0] = router.layer.weight.data[1, 1] = 1.0  # logit of expert 0 = x0, of 1 = x1
    x = torch.zeros(8, 16)
    x[:, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]]).repeat(4, 1)  # even tokens prefer 0 then 1, odd ones 1 then 0
    routing = router(x)
    capacity = 2  # ceil(0.5 * 8 tokens * 2 / 4 experts)
    for e in range(4):
        assert routing.kept_Nk[routing.experts_Nk == e].sum() <= capacity
    first_kept = routing.kept_Nk[:, 0]
    assert first_kept.sum() == 4 and not routing.kept_Nk[:, 1].any()  # the first choices fill both experts
    assert torch.equal(first_kept.nonzero().flatten(), torch.tensor([0, 1, 2, 3]))  # in token order
    assert torch.all(routing.gates_Nk[~routing.kept_Nk] == 0)
    torch.testing.assert_close(routing.dropped_share, torch.tensor(0.75))
    assert router.eval()(x).kept_Nk is None  # evaluation is dropless


def test_within_capacity_matches_a_loop():
    from jetmoe.model.routing import within_capacity

    experts_Nk = torch.stack([torch.randperm(6)[:3] for _ in range(40)])
    kept = within_capacity(experts_Nk, 6, 15)
    seen = [0] * 6
    for j in range(3):
        for n in range(40):
            e = int(experts_Nk[n, j])
            assert bool(kept[n, j]) == (seen[e] < 15)
            seen[e] += 1


def test_forced_uniform_routing_balances_every_expert_exactly():
    routing = TopKRouter(16, 4, 2, force_uniform=True)(torch.randn(10, 16))
    assert torch.equal(routing.counts_E, torch.full((4,), 5))
    assert torch.all(routing.experts_Nk[:, 0] != routing.experts_Nk[:, 1])  # k distinct experts per token
    torch.testing.assert_close(routing.gates_Nk, routing.logits_NE.gather(-1, routing.experts_Nk).softmax(-1))
