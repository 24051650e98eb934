"""The grouped expert path against the plain per-expert loop reference (forward and gradients)."""

import pytest
import torch
from numerics import relative_error

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.model import experts as experts_mod
from jetmoe.model.experts import (
    LOOP_ROWS, ParallelExperts, TopKRouter, expert_linear, gathered_products, grouped_mm_supported,
    resolve_expert_impl,
)
from jetmoe.model.ops import few_rows_padded


def _routed_rows(num_experts=4, top_k=2, tokens=37, dim=16):
    router = TopKRouter(dim, num_experts, top_k)
    routing = router(torch.randn(tokens, dim))
    return routing, torch.randn(tokens * top_k, dim, requires_grad=True)


@pytest.mark.parametrize("few_rows_faster", [True, False])  # what this CPU's timing of the two forms found
@pytest.mark.parametrize("tokens", [37, 5])  # 5 tokens: the loop's few-row products (`ops.few_rows_linear`)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_equals_loop(dtype, tokens, few_rows_faster, monkeypatch):
    routing, x = _routed_rows(tokens=tokens)
    x = x.detach().to(dtype).requires_grad_()
    w = torch.randn(4, 24, 16, dtype=dtype, requires_grad=True)
    dy = torch.randn(x.shape[0], 24, dtype=dtype)
    calls, few_rows_linear = [], experts_mod.few_rows_linear
    monkeypatch.setattr(experts_mod, "few_rows_linear", lambda x, w: calls.append(len(x)) or few_rows_linear(x, w))
    monkeypatch.setattr(experts_mod, "few_rows_form_faster", lambda rows, out, in_: few_rows_faster)
    outs, grads = {}, {}
    for impl in ("grouped", "loop"):
        y = expert_linear(x, w, routing.counts_E, routing.offsets_E, impl)
        outs[impl] = y
        grads[impl] = torch.autograd.grad(y, (x, w), dy)
    few = few_rows_faster and dtype == torch.float32 and x.shape[0] <= LOOP_ROWS
    assert calls == (few_rows_padded(routing.counts_E).tolist() if few else [])  # odd counts below 4: one more
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs["grouped"], outs["loop"], **tol)
    for g, r in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(g, r, **tol)


def test_few_rows_padded_makes_odd_counts_below_four_even():
    assert [few_rows_padded(rows) for rows in range(8)] == [0, 2, 2, 4, 4, 5, 6, 7]
    assert few_rows_padded(torch.arange(8)).tolist() == [0, 2, 2, 4, 4, 5, 6, 7]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_few_row_loop_equals_f_linear(backend, monkeypatch):
    """Compiled (row counts read as host scalars, unbacked while tracing), the loop's few-row products on padded
    counts give each expert's rows times its weight, for empty, odd and even counts and a spare row at the end."""
    monkeypatch.setattr(experts_mod, "few_rows_form_faster", lambda rows, out, in_: True)
    torch._dynamo.reset()
    compiled = torch.compile(expert_linear, backend=backend, fullgraph=True, dynamic=False)
    x, w = torch.randn(13, 16), torch.randn(6, 24, 16)
    for counts in ([0, 1, 3, 2, 6, 1], [5, 0, 4, 0, 1, 3], [13, 0, 0, 0, 0, 0]):
        counts_E = torch.tensor(counts)
        expected = torch.cat([chunk @ w[e].T for e, chunk in enumerate(x.split(counts))])
        with torch.no_grad():
            y = compiled(x, w, counts_E, counts_E.cumsum(0).int(), "loop")
        torch.testing.assert_close(y, expected)
    torch._dynamo.reset()


def test_empty_experts_are_fine():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(3, 12, 8, requires_grad=True)
    counts = torch.tensor([0, 6, 0])
    y = expert_linear(x, w, counts, counts.cumsum(0).int(), "grouped")
    torch.testing.assert_close(y, x @ w[1].T)
    y.backward(torch.ones_like(y))
    assert w.grad[0].abs().sum() == 0 and w.grad[1].abs().sum() > 0


def test_routing_is_sorted_and_complete():
    routing, _ = _routed_rows(num_experts=5, top_k=2, tokens=50)
    experts = routing.logits_NE.topk(2).indices.flatten()[routing.slot_M]
    assert torch.all(experts[1:] >= experts[:-1])  # rows grouped by expert
    assert routing.counts_E.sum() == 100 and routing.offsets_E[-1] == 100
    assert torch.equal(routing.slot_M.sort().values, torch.arange(100))  # every (token, slot) exactly once
    gates = torch.zeros(100).index_copy(0, routing.slot_M, routing.gates_M).view(50, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))


@pytest.mark.parametrize("top_k, experts", [(1, 4), (2, 8), (3, 3)])
def test_whole_model_grouped_equals_loop(top_k, experts, device):
    # fp32 where the device's grouped GEMM takes it (the CPU), else bf16 (CUDA's `torch._grouped_mm`)
    dtype = torch.float32 if grouped_mm_supported(device.type, torch.float32) else torch.bfloat16
    config = JetMoeConfig.from_name("test", num_local_experts=experts, num_experts_per_tok=top_k)
    grouped = JetMoeForCausalLM(config.replace(expert_impl="grouped")).to(device, dtype).train()
    loop = JetMoeForCausalLM(config.replace(expert_impl="loop")).to(device, dtype).train()
    loop.load_state_dict(grouped.state_dict())
    ids = torch.randint(0, 128, (2, 11), device=device)
    out_g, out_l = grouped(ids, labels=ids), loop(ids, labels=ids)
    out_g.loss.backward()
    out_l.loss.backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out_g.logits, out_l.logits, atol=1e-6, rtol=1e-5)
        for (name, p), q in zip(grouped.named_parameters(), loop.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    else:  # the two sum in other orders before rounding to bf16: compare whole tensors
        assert relative_error(out_g.logits, out_l.logits) < 1e-2
        for (name, p), q in zip(grouped.named_parameters(), loop.parameters()):
            assert relative_error(p.grad, q.grad) < 3e-2, name


def test_auto_resolves_to_grouped_on_cpu():
    assert grouped_mm_supported("cpu", torch.float32)
    assert resolve_expert_impl("auto", torch.device("cpu"), torch.float32) == "grouped"
    assert resolve_expert_impl("loop", torch.device("cpu"), torch.float32) == "loop"
    # Rows of 5 fp32 values break the 16-byte alignment rule: fall back to the loop.
    assert resolve_expert_impl("auto", torch.device("cpu"), torch.float32, ((8, 5), (5, 8))) == "loop"


def test_auto_resolves_to_grouped_in_bf16(device):
    """bf16 is the dtype `torch._grouped_mm` runs on CUDA (sm90 and later) as on the CPU."""
    assert resolve_expert_impl("auto", device, torch.bfloat16, ((64, 32), (32, 64))) == "grouped"


def test_per_slot_products_equal_the_gathered_form():
    """The CPU decode path (a BLAS product per slot) against the gathered multiply-sum used on other devices."""
    experts = ParallelExperts(num_experts=5, in_features=16, out_features=24, init_std=0.1)
    x_NkI, ids_Nk = torch.randn(3, 2, 16), torch.randint(0, 5, (3, 2))
    expected = gathered_products(experts.weight, x_NkI, ids_Nk)
    torch.testing.assert_close(experts.per_slot(x_NkI, ids_Nk), expected)
    shared_N1I = x_NkI[:, :1]  # one input for both slots (MoE input, MoA queries)
    expected = gathered_products(experts.weight, shared_N1I, ids_Nk)
    torch.testing.assert_close(experts.per_slot(shared_N1I, ids_Nk), expected)


@pytest.mark.parametrize("few_rows_faster", [True, False])  # what this CPU's timing of the two forms found
def test_small_cpu_batches_take_the_loop_compiled_or_in_fp32_inference(few_rows_faster, monkeypatch):
    """Compiled, a small batch takes the loop; in eager fp32 inference only where its few-row form is faster."""
    # The few-row form is faster (or not) for the output weight `[16, 8]` only: that is enough to take the loop.
    monkeypatch.setattr(experts_mod, "few_rows_form_faster", lambda rows, out, in_: few_rows_faster and out == 16)
    picks = []

    def pick(x, rows):
        picks.append(resolve_expert_impl("auto", x.device, x.dtype, ((8, 16), (16, 8)), rows=rows))
        return x + 1

    x = torch.ones(4)
    pick(x, 2)  # training
    with torch.no_grad():
        pick(x, LOOP_ROWS)
        pick(x, LOOP_ROWS + 1)
        pick(x.bfloat16(), 2)
    torch.compile(pick, backend="eager", fullgraph=True)(x.bfloat16(), LOOP_ROWS)
    torch.compile(pick, backend="eager", fullgraph=True)(x.bfloat16(), LOOP_ROWS + 1)
    eager_fp32 = "loop" if few_rows_faster else "grouped"
    assert picks == ["grouped", eager_fp32, "grouped", "grouped", "loop", "grouped"]


def test_unaligned_widths_still_run():
    config = JetMoeConfig.from_name("test", hidden_size=30, kv_channels=6, intermediate_size=10)
    out = JetMoeForCausalLM(config).eval()(torch.randint(0, 128, (1, 5)))
    assert torch.isfinite(out.logits).all()
