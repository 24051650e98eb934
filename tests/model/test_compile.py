"""The forward has no host-device synchronisation: the whole model traces as one graph (fullgraph=True)."""

import pytest
import torch
from numerics import relative_error

from jetmoe import JetMoeForCausalLM
from jetmoe.model import StaticKVCache
from jetmoe.model.generation import decode_step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_step_traces_as_one_graph(tiny_config):
    model = JetMoeForCausalLM(tiny_config).train()
    ids = torch.randint(0, 128, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # any graph break raises
    out = compiled(ids, labels=ids)
    out.loss.backward()
    eager = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-6, rtol=0)
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("batch, experts", [(1, 4), (1, 8), (3, 4), (3, 8)])
def test_decode_step_traces_as_one_graph_with_eager_numbers(tiny_config, batch, experts):
    """Batch 1: a product per routed row. Batch 3: a product per expert, whose output rows are a sum of unbacked
    counts (8 of them with 8 experts) that the MLP's second product must see as the routed rows again."""
    tiny_config = tiny_config.replace(num_local_experts=experts)
    model = JetMoeForCausalLM(tiny_config).eval()
    step = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    caches = [StaticKVCache(tiny_config, batch, 8, "cpu", torch.float32) for _ in range(2)]
    mask = torch.ones(batch, 8, dtype=torch.long)
    with torch.no_grad():
        for t in range(4):
            ids = torch.randint(0, 128, (batch, 1))
            pos = torch.full((batch, 1), t)
            compiled = step(model, ids, pos, caches[0], torch.tensor([t]), mask)
            eager = decode_step(model, ids, pos, caches[1], torch.tensor([t]), mask)
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert compiled.shape == (batch, 128)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiled_model_matches_eager(tiny_config, device, dtype):
    """bf16 on a CPU with bf16 units: the compiled step takes the custom op `jetmoe::causal_attention`."""
    model = JetMoeForCausalLM(tiny_config).to(device, dtype).train()
    ids = torch.randint(0, 128, (2, 16), device=device)
    out = torch.compile(model, fullgraph=True)(ids, labels=ids)
    out.loss.backward()
    compiled_grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    eager = model(ids, labels=ids)
    eager.loss.backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=0)
    else:  # fused differently, rounded to bf16 in other places
        torch.testing.assert_close(out.loss, eager.loss, atol=1e-2, rtol=0)
    for name, p in model.named_parameters():
        assert relative_error(compiled_grads[name], p.grad) < (1e-4 if dtype == torch.float32 else 3e-2), name


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_with_inductor_compiled_static_step_matches_dynamic(tiny_config, batch, device):
    model = JetMoeForCausalLM(tiny_config).to(device).eval()
    ids = torch.randint(3, 128, (batch, 5), device=device)
    dynamic = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    compiled = model.generate(ids, max_new_tokens=6, eos_token_id=[], static_cache=True, compile=True)
    assert torch.equal(dynamic, compiled)
