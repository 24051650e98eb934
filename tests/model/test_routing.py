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
