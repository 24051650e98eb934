"""Sparse upcycling (`jetmoe.model.upcycle`): the upcycled model computes the dense model's logits, its routers keep
their own init, noise sets the copies apart, and a dense model that does not fit is a ConfigError naming the field."""

import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.errors import ConfigError
from jetmoe.model.upcycle import is_router_key, upcycle_state_dict


def _dense(kernels: str = "fused", **overrides) -> JetMoeForCausalLM:
    """A dense model (one expert, gate 1) with random weights everywhere: a fresh model's unit norms and zero biases
    would hide a norm or bias that was not copied."""
    config = JetMoeConfig.from_name("test", num_local_experts=1, num_experts_per_tok=1, kernels=kernels, **overrides)
    model = JetMoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.1) if name.endswith("norm.weight") else param.normal_(0.0, 0.2)
    return model


def _upcycled(dense: JetMoeForCausalLM, E: int, k: int, noise: float = 0.0, generator=None) -> JetMoeForCausalLM:
    config = dense.config.replace(num_local_experts=E, num_experts_per_tok=k)
    model = JetMoeForCausalLM(config).eval()
    state = upcycle_state_dict(dense.state_dict(), dense.config, config, noise, generator)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing and all(is_router_key(key) for key in missing)
    return model


@pytest.mark.parametrize("kernels", ["reference", "fused"])
@pytest.mark.parametrize(("E", "k", "tied"), [(4, 2, True), (8, 2, True), (4, 2, False)])
def test_upcycled_model_computes_the_dense_models_logits(kernels, E, k, tied):
    dense = _dense(kernels, tie_word_embeddings=tied)
    upcycled = _upcycled(dense, E, k)
    with torch.no_grad():  # routers far from uniform: the invariant holds whatever they pick
        for name, param in upcycled.named_parameters():
            if is_router_key(name):
                param.normal_(0.0, 1.0)
    input_ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected, got = dense(input_ids).logits, upcycled(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_routers_keep_the_new_models_seeded_init():
    dense = _dense()
    dense_state = dense.state_dict()
    dense_state["model.layers.0.mlp.router.expert_bias"] = torch.ones(1)  # router buffers are left out too
    config = dense.config.replace(num_local_experts=4, num_experts_per_tok=2)
    state = upcycle_state_dict(dense_state, dense.config, config)
    assert not any(is_router_key(key) for key in state) and state.keys() < dense_state.keys()
    torch.manual_seed(1)
    fresh = JetMoeForCausalLM(config).state_dict()
    torch.manual_seed(1)
    upcycled = _upcycled(dense, 4, 2).state_dict()
    routers = [key for key in upcycled if is_router_key(key)]
    assert len(routers) == 2 * config.num_hidden_layers
    for key in routers:
        torch.testing.assert_close(upcycled[key], fresh[key], atol=0, rtol=0, msg=key)
    torch.testing.assert_close(upcycled["model.layers.1.mlp.bias"], dense_state["model.layers.1.mlp.bias"])


def test_noise_gives_each_copy_its_own_draw_of_the_requested_size():
    dense = _dense()
    upcycled = _upcycled(dense, 4, 2, noise=0.1, generator=torch.Generator().manual_seed(0))
    again = _upcycled(dense, 4, 2, noise=0.1, generator=torch.Generator().manual_seed(0))
    w_1OI = dense.model.layers[0].self_attention.experts.input_linear.weight
    delta_EOI = (upcycled.model.layers[0].self_attention.experts.input_linear.weight - w_1OI).detach()
    assert delta_EOI.std().item() == pytest.approx(0.1 * w_1OI.std().item(), rel=0.1)
    assert not torch.allclose(delta_EOI[0], delta_EOI[1])
    for key, tensor in upcycled.state_dict().items():  # the generator's seed decides the noise
        if not is_router_key(key):
            torch.testing.assert_close(tensor, again.state_dict()[key], atol=0, rtol=0, msg=key)
    input_ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (upcycled(input_ids).logits - dense(input_ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("dense_overrides", "message"),
    [
        ({"num_local_experts": 8, "num_experts_per_tok": 2},
         r"^the dense model is an MoE model \(num_local_experts=8\); upcycling starts from a dense model "
         r"\(num_local_experts=1\)$"),
        ({"hidden_size": 32}, r"^the dense model has hidden_size=32, but the upcycled model has hidden_size=64$"),
        ({"vocab_size": 300}, r"has vocab_size=300, but the upcycled model has vocab_size=128$"),
        ({"num_hidden_layers": 3}, r"has num_hidden_layers=3, but the upcycled model has num_hidden_layers=2$"),
        ({"num_key_value_heads": 4}, r"has num_key_value_heads=4, but the upcycled model has num_key_value_heads=2$"),
        ({"kv_channels": 8}, r"has kv_channels=8, but the upcycled model has kv_channels=16$"),
        ({"intermediate_size": 128}, r"has intermediate_size=128, but the upcycled model has intermediate_size=64$"),
        ({"tie_word_embeddings": False},
         r"has tie_word_embeddings=False, but the upcycled model has tie_word_embeddings=True$"),
        ({"activation_function": "gelu"},  # same shapes, another function: no longer the dense model
         r"has activation_function='gelu', but the upcycled model has activation_function='silu'$"),
    ],
)
def test_a_dense_model_that_does_not_fit_names_the_field(dense_overrides, message):
    dense_config = JetMoeConfig.from_name("test", **{"num_local_experts": 1, "num_experts_per_tok": 1,
                                                       **dense_overrides})
    config = JetMoeConfig.from_name("test")
    with torch.device("meta"):
        dense_state = JetMoeForCausalLM(dense_config).state_dict()
    with pytest.raises(ConfigError, match=message):
        upcycle_state_dict(dense_state, dense_config, config)


def test_negative_noise_is_a_config_error():
    dense = _dense()
    config = dense.config.replace(num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match=r"noise must be >= 0, got -0.5"):
        upcycle_state_dict(dense.state_dict(), dense.config, config, noise=-0.5)
