import json

import pytest

from jetmoe import JetMoeConfig
from jetmoe.config import PRESETS


def test_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    ours, theirs = JetMoeConfig(), transformers.JetMoeConfig()
    for name in [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels", "intermediate_size",
        "max_position_embeddings", "activation_function", "num_local_experts", "num_experts_per_tok",
        "output_router_logits", "aux_loss_coef", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
        "tie_word_embeddings", "rms_norm_eps", "initializer_range", "attention_dropout", "num_attention_heads",
    ]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_experts_per_tok": 3, "num_local_experts": 2}, "num_experts_per_tok (3) must be <= num_local_experts"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
        ({"activation_function": "swish2"}, "activation_function must be one of"),
        ({"kv_channels": 15}, "kv_channels must be even"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a positive number"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef must be a non-negative number"),
        ({"attention_dropout": 1.5}, "attention_dropout must be in [0, 1)"),
        ({"eos_token_id": 10**6}, "eos_token_id must be an integer in [0, vocab_size=32000)"),
        ({"expert_impl": "fast"}, "expert_impl must be one of"),
        ({"balancing": "loss_free"}, "balancing must be one of aux_global, aux_per_router, bias, none"),
        ({"bias_update_rate": -1e-3}, "bias_update_rate must be a non-negative number"),
        ({"capacity_factor": 0}, "capacity_factor must be a positive number or null (dropless)"),
        ({"capacity_factor": float("inf")}, "capacity_factor must be a positive number"),
        ({"router_force_uniform": 1}, "router_force_uniform must be true or false"),
    ],
)
def test_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        JetMoeConfig(**changes)


def test_num_attention_heads_is_derived():
    assert JetMoeConfig(num_key_value_heads=4, num_experts_per_tok=3).num_attention_heads == 12


def test_rope_parameters_spelling_is_accepted():
    config = JetMoeConfig(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    assert config.rope_theta == 5e5
    with pytest.raises(ValueError, match="rope_type"):
        JetMoeConfig(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn"})


def test_dict_round_trip_and_unknown_keys():
    config = JetMoeConfig.from_name("test", router_z_loss_coef=0.001)
    assert JetMoeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown JetMoeConfig field.*hiden_size"):
        JetMoeConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="model_type must be 'jetmoe'"):
        JetMoeConfig.from_dict({"model_type": "llama"})


@pytest.mark.parametrize("per_router, balancing", [(True, "aux_per_router"), (False, "aux_global")])
def test_config_json_of_earlier_versions_loads(per_router, balancing):
    old = {k: v for k, v in JetMoeConfig.from_name("test").to_dict().items() if k != "balancing"}
    assert JetMoeConfig.from_dict({**old, "aux_loss_per_router": per_router}).balancing == balancing
    assert JetMoeConfig.from_dict({**old, "aux_loss_per_router": True, "balancing": "none"}).balancing == "none"


def test_transformers_reads_our_dict():
    transformers = pytest.importorskip("transformers")
    config = JetMoeConfig.from_name("small")
    hf = transformers.JetMoeConfig(**{k: v for k, v in config.to_dict().items() if k != "num_attention_heads"})
    assert (hf.hidden_size, hf.num_attention_heads, hf.rope_parameters["rope_theta"]) == (128, 8, 10000.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_match_the_model(name):
    import torch

    from jetmoe import JetMoeForCausalLM

    config = JetMoeConfig.from_name(name)
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    counts = config.num_parameters()
    assert counts["total"] == model.num_parameters()
    assert counts["active"] < counts["total"]


def test_jetmoe_8b_counts_match_the_paper():
    counts = JetMoeConfig.from_name("jetmoe-8b").num_parameters()
    assert 8.0e9 < counts["total"] < 8.7e9  # paper: 8B total
    assert 2.1e9 < counts["active"] < 2.4e9  # paper: 2.2B active


def test_small_preset_is_cpu_sized():
    counts = JetMoeConfig.from_name("small").num_parameters()
    assert 1e6 < counts["total"] < 2e7


def test_replace_validates():
    config = JetMoeConfig.from_name("test")
    assert config.replace(rope_theta=123.0).rope_theta == 123.0
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config.replace(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="unknown preset"):
        JetMoeConfig.from_name("huge")
