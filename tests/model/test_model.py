"""Parity with transformers' JetMoe on tiny configs (fp32; on the CPU, and on CUDA under `-m gpu`), plus the
model's own contracts."""

import pytest
import torch
import torch.nn.functional as F

from hf_reference import hf_twin
from jetmoe import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel

ATOL = 1e-5


def _padded_batch(pad_id: int, left: bool):
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 6]):
        cols = slice(0, n_pad) if left else slice(10 - n_pad, 10)
        ids[row, cols], mask[row, cols] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_causal_lm_matches_transformers(tiny_config, device, kernels):
    model = JetMoeForCausalLM(tiny_config.replace(kernels=kernels)).to(device).eval()
    hf = hf_twin(model).to(device)
    ids = torch.randint(0, 128, (2, 16), device=device)
    atol = ATOL if device.type == "cpu" else 1e-4  # CUDA kernels sum in other orders
    with torch.no_grad():
        ours = model(ids, labels=ids, output_router_logits=True, output_hidden_states=True, output_attentions=True)
        theirs = hf(ids, labels=ids, output_router_logits=True, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=atol, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=atol, rtol=0)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=atol, rtol=0)
    assert len(ours.router_logits) == len(theirs.router_logits) == 2 * tiny_config.num_hidden_layers
    for a, b in zip(ours.router_logits, theirs.router_logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == tiny_config.num_hidden_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_training_loss_and_gradients_match_transformers(tiny_config, kernels):
    """The default training call (`model(ids, labels=ids)` in train mode: the fused LM-head loss) against
    transformers' training forward with its load-balancing loss."""
    model = JetMoeForCausalLM(tiny_config.replace(kernels=kernels)).train()
    hf = hf_twin(model).train()
    ids = torch.randint(0, 128, (2, 16))
    ours = model(ids, labels=ids)
    theirs = hf(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_padded_batch_matches_transformers(tiny_config, left):
    model = JetMoeForCausalLM(tiny_config).eval()
    hf = hf_twin(model)
    ids, mask = _padded_batch(tiny_config.pad_token_id, left)
    # A label counts only when the position predicting it is a real token too (padding positions' logits are
    # arbitrary in both libraries).
    predictor_is_pad = F.pad(mask, (1, 0))[:, :-1] == 0
    labels = ids.masked_fill((mask == 0) | predictor_is_pad, -100)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        theirs = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=ATOL, rtol=0)
    for a, b in zip(ours.router_logits, theirs.router_logits):
        torch.testing.assert_close(a[real.flatten()], b[real.flatten()], atol=ATOL, rtol=0)
    assert torch.isfinite(ours.logits).all()


def test_logits_to_keep_and_inputs_embeds(tiny_config):
    model = JetMoeForCausalLM(tiny_config).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        embeds = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(embeds, full)


def test_aux_loss_is_computed_while_training_without_router_logits(tiny_config):
    model = JetMoeForCausalLM(tiny_config).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.router_logits is None
    expected = out.ce_loss + tiny_config.aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.layers[0].mlp.router.layer.weight.grad.abs().sum() > 0
    assert model.eval()(ids, labels=ids).aux_loss is None  # HF behaviour at inference


def test_z_loss_enters_the_total(tiny_config):
    model = JetMoeForCausalLM(tiny_config.replace(router_z_loss_coef=0.5)).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    assert out.z_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.01 * out.aux_loss + 0.5 * out.z_loss)


def _balancing_from_logits(router_logits, k):
    """Per router from its logits alone: f = share of the top-k assignments (summing to k), P = mean probability."""
    E = router_logits[0].shape[-1]
    f = torch.stack([F.one_hot(r.topk(k).indices, E).sum(1).float().mean(0) for r in router_logits])
    P = torch.stack([r.softmax(-1).mean(0) for r in router_logits])
    return f, P


def test_per_router_aux_loss_option(tiny_config):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(tiny_config.replace(balancing="aux_per_router")).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids, output_router_logits=True)
    f, P = _balancing_from_logits(out.router_logits, tiny_config.num_experts_per_tok)
    E = tiny_config.num_local_experts
    torch.testing.assert_close(out.aux_loss, (E * (f * P).sum(-1)).mean())
    assert not torch.allclose(out.aux_loss, E * (f.mean(0) * P.mean(0)).sum())  # the HF definition differs


def test_bias_balancing_aux_loss_is_sequence_wise(tiny_config):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(tiny_config.replace(balancing="bias")).train()
    ids = torch.randint(0, 128, (3, 8))
    out = model(ids, labels=ids, output_router_logits=True)
    k, E = tiny_config.num_experts_per_tok, tiny_config.num_local_experts
    per_row = [_balancing_from_logits([r.view(3, 8, E)[b] for r in out.router_logits], k) for b in range(3)]
    expected = torch.stack([(E * (f * P).sum(-1)).mean() for f, P in per_row]).mean()  # rows, then routers
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.01 * out.aux_loss)  # aux_loss_coef weighs it


def test_no_balancing_has_no_aux_loss(tiny_config):
    model = JetMoeForCausalLM(tiny_config.replace(balancing="none", router_z_loss_coef=0.1)).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    assert out.aux_loss == 0 and out.z_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.1 * out.z_loss)


def test_output_object_access(tiny_config):
    out = JetMoeForCausalLM(tiny_config).eval()(torch.randint(0, 128, (1, 4)))
    assert out["logits"] is out.logits
    assert out.to_tuple()[0] is out.logits  # None fields are dropped, as in transformers


def test_base_model_matches_transformers(tiny_config):
    model = JetMoeModel(tiny_config).eval()
    hf = hf_twin(model, "JetMoeModel")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "num_labels, labels",
    [
        (3, torch.tensor([0, 2, 1])),  # single-label
        (1, torch.tensor([0.5, -1.0, 2.0])),  # regression
        (2, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])),  # multi-label
    ],
    ids=["single", "regression", "multi"],
)
def test_sequence_classification_matches_transformers(tiny_config, num_labels, labels):
    model = JetMoeForSequenceClassification(tiny_config.replace(num_labels=num_labels)).eval()
    hf = hf_twin(model, "JetMoeForSequenceClassification")
    ids, mask = _padded_batch(tiny_config.pad_token_id, left=False)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels)
        theirs = hf(ids, attention_mask=mask, labels=labels)
    assert ours.logits.shape == (3, num_labels)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.tensor([[1, 500]])}, r"input_ids must be in \[0, vocab_size=128\)"),
        ({"input_ids": torch.tensor([[1, -1]])}, r"input_ids must be in \[0, vocab_size=128\)"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(1, 300, dtype=torch.long)}, "exceeds max_position_embeddings=256"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}, "attention_mask"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 1, 4, 3).bool()},
         "4-D attention_mask"),
        ({"input_ids": torch.ones(1, 4)}, "integer tensor"),
        ({}, "exactly one of input_ids or inputs_embeds"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        JetMoeForCausalLM(tiny_config).eval()(**kwargs)


def test_gradient_checkpointing_gives_equal_gradients(tiny_config, device):
    model = JetMoeForCausalLM(tiny_config).to(device).train()
    ids = torch.randint(0, 128, (2, 12), device=device)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_meta_build_then_init_equals_eager_build(tiny_config):
    torch.manual_seed(3)
    eager = JetMoeForCausalLM(tiny_config)
    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = JetMoeForCausalLM(tiny_config)
    assert lazy.lm_head.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.tie_weights()
    lazy.init_weights()
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight


def test_init_follows_transformers_recipe(tiny_config):
    model = JetMoeForCausalLM(tiny_config.replace(initializer_range=0.02))
    layer = model.model.layers[0]
    assert abs(layer.mlp.input_linear.weight.std().item() - 0.02) < 2e-3
    assert torch.all(layer.mlp.bias == 0) and torch.all(layer.self_attention.experts.bias == 0)
    assert torch.all(layer.input_layernorm.weight == 1)
    assert torch.all(model.model.embed_tokens.weight[tiny_config.pad_token_id] == 0)


def test_bf16_keeps_routers_in_fp32(tiny_config, device):
    model = JetMoeForCausalLM(tiny_config).to(device, torch.bfloat16).train()
    ids = torch.randint(0, 128, (2, 8), device=device)
    out = model(ids, labels=ids, output_router_logits=True, skip_logits=False)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    out.loss.backward()
    assert torch.isfinite(out.loss)
