import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jetmoe.training.expert_metrics import RouterUtilization, router_names
from model_helpers import routes

E, K = 8, 2


def make_metric(num_routers=2, num_experts=E, top_k=K, **kwargs):
    return RouterUtilization(num_routers, num_experts, top_k, **kwargs)


def feed(metric, logits, mask=None):
    """`metric.update` with the routings the model's routers would give for these logits."""
    metric.update(routes(logits, metric.top_k), mask)


def balanced_logits(num_tokens, num_experts=E, top_k=K, eps=1e-4):
    """Near-uniform logits whose top-k sets rotate over the experts: uniform load and ~uniform softmax."""
    token_N1 = torch.arange(num_tokens)[:, None]
    favoured_NK = (token_N1 + torch.arange(top_k)) % num_experts
    bias_NK = eps * torch.arange(top_k, 0, -1, dtype=torch.float32).expand(num_tokens, top_k)
    return torch.zeros(num_tokens, num_experts).scatter(1, favoured_NK, bias_NK)


def reference_stats(logits_NE, top_k, dead_threshold=0.1):
    """Straightforward per-token reference for one router."""
    num_tokens, num_experts = logits_NE.shape
    counts = [0] * num_experts
    prob_sum = [0.0] * num_experts
    entropy = ratio = 0.0
    for row in logits_NE.double():
        p = row.softmax(-1).tolist()
        order = sorted(range(num_experts), key=lambda e: -p[e])
        for e in order[:top_k]:
            counts[e] += 1
        for e in range(num_experts):
            prob_sum[e] += p[e]
        entropy -= sum(pe * math.log(pe) for pe in p if pe > 0)
        ratio += (p[order[1]] / p[order[0]]) if num_experts > 1 else 0.0
    load = [c / (num_tokens * top_k) for c in counts]
    prob = [s / num_tokens for s in prob_sum]
    mean = sum(load) / num_experts
    std = math.sqrt(sum((x - mean) ** 2 for x in load) / num_experts)
    return {
        "load": load,
        "prob": prob,
        "imbalance": max(load) / mean,
        "cv": std / mean,
        "entropy": entropy / num_tokens,
        "dead_fraction": sum(x < dead_threshold / num_experts for x in load) / num_experts,
        "top1_top2_ratio": ratio / num_tokens,
        "balance_loss": num_experts * sum(top_k * f * p for f, p in zip(load, prob)),  # k when balanced
    }


def assert_matches_reference(stats, logits_per_router, top_k):
    for r, logits_NE in enumerate(logits_per_router):
        ref = reference_stats(logits_NE, top_k)
        for key, expected in ref.items():
            torch.testing.assert_close(stats[key][r].double(), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5, msg=key)


def test_router_names():
    assert router_names(2) == ["moa/layer_0", "moe/layer_0", "moa/layer_1", "moe/layer_1"]


def test_balanced_routing():
    metric = make_metric()
    logits = balanced_logits(4 * E)
    feed(metric, (logits, logits))
    stats = metric.compute()
    torch.testing.assert_close(stats["load"], torch.full((2, E), 1 / E))
    torch.testing.assert_close(stats["imbalance"], torch.ones(2))
    torch.testing.assert_close(stats["cv"], torch.zeros(2))
    torch.testing.assert_close(stats["entropy_norm"], torch.ones(2))
    torch.testing.assert_close(stats["dead_fraction"], torch.zeros(2))
    torch.testing.assert_close(stats["top1_top2_ratio"], torch.ones(2), rtol=0, atol=1e-3)
    torch.testing.assert_close(stats["balance_loss"], torch.full((2,), float(K)))  # the training loss's k
    assert stats["tokens"].sum(-1).tolist() == [4 * E * K] * 2
    assert stats["num_tokens"].tolist() == [4 * E] * 2


def test_collapsed_routing():
    logits = torch.zeros(64, E)
    logits[:, 0], logits[:, 1] = 20.0, 10.0
    metric = make_metric(num_routers=1)
    feed(metric, (logits,))
    stats = metric.compute()
    assert stats["dead_fraction"].item() == pytest.approx((E - K) / E)
    assert stats["imbalance"].item() == pytest.approx(E / K)
    assert stats["entropy_norm"].item() < 1e-3
    assert stats["top1_top2_ratio"].item() == pytest.approx(math.exp(-10), rel=1e-3)
    torch.testing.assert_close(stats["top1_load"][0], torch.eye(E)[0])


def test_matches_reference_and_accumulates():
    torch.manual_seed(0)
    logits_per_router = [torch.randn(96, E) * 2 for _ in range(4)]
    metric = make_metric(num_routers=4)
    for chunk in range(3):
        feed(metric, tuple(logits[chunk * 32:(chunk + 1) * 32] for logits in logits_per_router))
    stats = metric.compute()
    assert_matches_reference(stats, logits_per_router, K)
    torch.testing.assert_close(stats["load"].sum(-1), torch.ones(4))


def test_mask_excludes_padding():
    torch.manual_seed(1)
    real = [torch.randn(20, E) for _ in range(2)]
    padded = [torch.cat([logits, torch.full((12, E), 0.0).index_fill(1, torch.tensor([3]), 50.0)]) for logits in real]
    mask_BT = torch.cat([torch.ones(20), torch.zeros(12)]).long().reshape(2, 16)  # any shape / int dtype
    masked, reference = make_metric(), make_metric()
    feed(masked, tuple(padded), mask_BT)
    feed(reference, tuple(real))
    for key, value in reference.compute().items():
        torch.testing.assert_close(masked.compute()[key], value, msg=key)


def test_top1_routing():
    torch.manual_seed(2)
    logits_per_router = [torch.randn(50, E) for _ in range(2)]
    metric = make_metric(top_k=1)
    feed(metric, logits_per_router)
    stats = metric.compute()
    assert_matches_reference(stats, logits_per_router, 1)
    torch.testing.assert_close(stats["load"], stats["top1_load"])
    assert ((0 < stats["top1_top2_ratio"]) & (stats["top1_top2_ratio"] < 1)).all()


def test_single_expert_is_defined():
    metric = make_metric(num_routers=2, num_experts=1, top_k=1)
    feed(metric, (torch.randn(10, 1), torch.randn(10, 1)))
    stats = metric.compute()
    for key in ("imbalance", "entropy_norm", "balance_loss"):  # balance_loss: k = 1
        torch.testing.assert_close(stats[key], torch.ones(2), msg=key)
    for key in ("cv", "entropy", "dead_fraction", "top1_top2_ratio"):
        torch.testing.assert_close(stats[key], torch.zeros(2), msg=key)


def test_empty_metric_is_zero_not_nan():
    metric = make_metric()
    with pytest.warns(UserWarning, match="before the ``update``"):
        stats = metric.compute()
    for key, value in stats.items():
        assert not value.isnan().any() and (value == 0).all(), key


def test_all_masked_batch_adds_nothing():
    metric = make_metric()
    feed(metric, (torch.randn(8, E), torch.randn(8, E)), torch.zeros(8, dtype=torch.bool))
    stats = metric.compute()
    assert stats["num_tokens"].tolist() == [0, 0] and stats["dead_fraction"].tolist() == [0, 0]


def test_rejects_the_wrong_number_of_routings():
    with pytest.raises(ValueError, match="expected 2 routings"):
        feed(make_metric(), (torch.randn(4, E),))


def test_merge_state_folds_windows_into_a_total():
    torch.manual_seed(3)
    chunks = [tuple(torch.randn(16, E) for _ in range(2)) for _ in range(3)]
    total, window, reference = make_metric(), make_metric(), make_metric()
    for chunk in chunks:
        feed(reference, chunk)
        feed(window, chunk)
        total.merge_state(window)
        window.reset()
        total.compute()  # a cached result must not survive the next merge
    for key, value in reference.compute().items():
        torch.testing.assert_close(total.compute()[key], value, msg=key)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, local):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # every rank builds the same full data set
        logits_per_router = [torch.randn(64, E) for _ in range(4)]
        mask_N = torch.rand(64) > 0.25
        full = make_metric(num_routers=4, sync_on_compute=False)
        feed(full, logits_per_router, mask_N)
        expected = full.compute()

        shard = slice(rank * 32, (rank + 1) * 32)
        feed(local, [logits[shard] for logits in logits_per_router], mask_N[shard])
        local_tokens = local.tokens_R.clone()
        for key, value in local.compute().items():
            torch.testing.assert_close(value, expected[key], msg=key)
        torch.testing.assert_close(local.tokens_R, local_tokens)  # local state restored after the sync
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_reduction_equals_single_process():
    # The metric travels to the ranks like under ddp_spawn: torch's pickler puts its CPU states in
    # shared memory, so this also checks that updates never write into them in place.
    mp.spawn(_distributed_worker, args=(2, _free_port(), make_metric(num_routers=4)), nprocs=2, join=True)



def test_dropped_share_counts_the_rows_dropped_for_capacity():
    from jetmoe.model.routing import TopKRouter

    torch.manual_seed(0)
    routers = [TopKRouter(8, E, K, capacity_factor=cf).train() for cf in (0.5, None)]
    x_ND = torch.randn(40, 8)
    routings = [router(x_ND) for router in routers]
    mask = torch.arange(40) < 30  # the last 10 tokens are padding
    metric = make_metric()
    metric.update(routings, mask)
    stats = metric.compute()
    dropped_capacity = (~routings[0].kept_Nk[:30]).sum() / (30 * K)
    torch.testing.assert_close(stats["dropped_share"], torch.stack([dropped_capacity, torch.tensor(0.0)]))
    assert stats["dropped_share"][0] > 0.3  # capacity 0.5: at least half the rows cannot be kept
