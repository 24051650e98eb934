"""KV-cache decoding equals full forwards; greedy generation equals transformers'."""

import pytest
import torch

from hf_reference import hf_twin
from jetmoe import DynamicKVCache, JetMoeForCausalLM


@pytest.fixture
def model(tiny_config):
    return JetMoeForCausalLM(tiny_config).eval()


def test_incremental_decoding_equals_full_forward(model):
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicKVCache(model.config.num_hidden_layers)
        first = model(ids[:, :5], past_key_values=cache, use_cache=True)
        steps = [first.logits]
        steps.append(model(ids[:, 5:8], past_key_values=cache, use_cache=True).logits)  # a chunk with a past
        for t in range(8, 12):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(model):
    hf = hf_twin(model)
    ids = torch.randint(3, 128, (1, 6))
    ours = model.generate(ids, max_new_tokens=12)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_static_cache_and_compiled_step_match_dynamic(model):
    ids = torch.randint(3, 128, (2, 5))
    dynamic = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    static = model.generate(ids, max_new_tokens=6, eos_token_id=[], static_cache=True)
    assert torch.equal(dynamic, static)
    assert dynamic.shape == (2, 11)


def test_left_padded_batch_generates_like_single_rows(tiny_config, device):
    model = JetMoeForCausalLM(tiny_config).to(device).eval()
    prompts = [torch.randint(3, 128, (n,), device=device) for n in (7, 4, 2)]
    pad = model.config.pad_token_id
    ids = torch.full((3, 7), pad, device=device)
    mask = torch.zeros(3, 7, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, 7 - len(p):], mask[row, 7 - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=5, eos_token_id=[])
        assert torch.equal(batched[row, 7:], single[0, len(p):]), row
    static = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], static_cache=True)
    assert torch.equal(static, batched)


def test_stops_at_eos_and_pads_finished_rows(model):
    ids = torch.randint(3, 128, (2, 4))
    greedy = model.generate(ids, max_new_tokens=3, eos_token_id=[])
    first_new = int(greedy[0, 4])
    out = model.generate(ids, max_new_tokens=8, eos_token_id=first_new, pad_token_id=0)
    assert out[0, 4] == first_new
    assert torch.all(out[0, 5:] == 0) or out.shape[1] == 5


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    ids = torch.randint(3, 128, (1, 4))
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    top1 = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[])
    assert torch.equal(greedy, top1)
    draws = [
        model.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[],
                       generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "non-empty"),
        ({"input_ids": torch.ones(1, 250, dtype=torch.long), "max_new_tokens": 10}, "exceeds max_position"),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long), "do_sample": True, "temperature": 0.0}, "temperature"),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 2)}, "attention_mask"),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long), "do_sample": True, "top_p": 1.5}, "top_p"),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long), "do_sample": True, "top_k": -1}, "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_generate_runs_in_eval_mode_and_restores_training(tiny_config):
    model = JetMoeForCausalLM(tiny_config.replace(attention_dropout=0.5)).train()
    ids = torch.randint(3, 128, (1, 6))
    first, second = (model.generate(ids, max_new_tokens=8, eos_token_id=[]) for _ in range(2))
    assert torch.equal(first, second)  # no dropout while generating
    assert all(m.training for m in model.modules())
    model.eval()
    model.generate(ids, max_new_tokens=2, eos_token_id=[])
    assert not any(m.training for m in model.modules())
