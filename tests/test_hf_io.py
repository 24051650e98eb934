"""HF-format checkpoints both ways, and loading errors that say what is wrong."""

import json

import pytest
import torch

from hf_reference import hf_twin
from jetmoe import (
    JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel, load_pretrained, save_pretrained,
)
from jetmoe.errors import UserError

transformers = pytest.importorskip("transformers")


def test_our_checkpoint_loads_in_transformers(tiny_config, tmp_path):
    model = JetMoeForCausalLM(tiny_config).eval()
    save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)  # no tokenizer needed: only the config
    assert (generation.bos_token_id, generation.eos_token_id, generation.max_length) == (
        tiny_config.bos_token_id, tiny_config.eos_token_id, tiny_config.max_position_embeddings)
    hf, info = transformers.JetMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf.eval()(ids).logits, atol=1e-5, rtol=0)


def test_transformers_checkpoint_loads_here(tiny_config, tmp_path):
    hf = hf_twin(JetMoeForCausalLM(tiny_config))
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path).eval()
    assert model.config.hidden_size == tiny_config.hidden_size
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_untied_head_and_base_model_round_trip(tiny_config, tmp_path):
    model = JetMoeForCausalLM(tiny_config.replace(tie_word_embeddings=False))
    save_pretrained(model, tmp_path / "lm")
    again = load_pretrained(tmp_path / "lm")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    base = load_pretrained(tmp_path / "lm", JetMoeModel)  # task checkpoint -> base model: `model.` prefix dropped
    assert torch.equal(base.embed_tokens.weight, model.model.embed_tokens.weight)


def test_sequence_classifier_round_trip_with_transformers(tiny_config, tmp_path):
    model = JetMoeForSequenceClassification(tiny_config.replace(num_labels=3))
    save_pretrained(model, tmp_path)
    hf = transformers.JetMoeForSequenceClassification.from_pretrained(tmp_path)
    assert hf.config.num_labels == 3
    hf.save_pretrained(tmp_path / "back")
    again = load_pretrained(tmp_path / "back", JetMoeForSequenceClassification)
    assert torch.equal(again.score.weight, model.score.weight)


def test_mismatched_checkpoint_lists_the_problems(tiny_config, tmp_path):
    save_pretrained(JetMoeForCausalLM(tiny_config.replace(hidden_size=32)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="shape mismatch.*model.embed_tokens.weight"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "corrupted weights file"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "model_type must be 'jetmoe'"),
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    ],
)
def test_broken_checkpoints_fail_with_the_file_named(tiny_config, tmp_path, corrupt, message):
    save_pretrained(JetMoeForCausalLM(tiny_config), tmp_path)
    corrupt(tmp_path)
    with pytest.raises(UserError, match=message):
        load_pretrained(tmp_path)


def test_legacy_bin_is_loaded_without_unpickling_code(tiny_config, tmp_path):
    model = JetMoeForCausalLM(tiny_config)
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert torch.equal(load_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_pretrained(tmp_path)


def test_config_json_fields(tiny_config, tmp_path):
    save_pretrained(JetMoeForCausalLM(tiny_config), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "jetmoe" and config["architectures"] == ["JetMoeForCausalLM"]
    assert JetMoeConfig.from_dict(config) == tiny_config


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache in `tmp_path`: huggingface_hub's own lookup, no network."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_name_loads_from_the_hugging_face_cache(tiny_config, offline_hub, tmp_path):
    """The cache layout `snapshot_download` reads: models--owner--name/{refs/main, snapshots/<commit>/}."""
    model = JetMoeForCausalLM(tiny_config).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--someone--tiny-jetmoe"
    save_pretrained(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_pretrained("someone/tiny-jetmoe").eval()
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_a_hub_name_missing_offline_is_one_line(offline_hub):
    with pytest.raises(UserError, match=r"^someone/absent: not a local directory, and the hub repository could not "
                                        r"be read \([^\n]*\)$"):
        load_pretrained("someone/absent")


def test_selection_biases_are_exported_with_a_warning(tiny_config, tmp_path, caplog):
    """balancing=bias: the biases travel in model.safetensors under a key jetmoe reads; transformers loads the
    directory but routes without them, which the export says in one line."""
    model = JetMoeForCausalLM(tiny_config.replace(balancing="bias")).eval()
    for router in model.routers():
        router.expert_bias.copy_(torch.randn(tiny_config.num_local_experts))
    with caplog.at_level("WARNING", logger="jetmoe"):
        save_pretrained(model, tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "transformers' JetMoe routes this model without its selection biases" in warning and "\n" not in warning
    again = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
        hf, info = transformers.JetMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        assert all(key.endswith("router.expert_bias") for key in info["unexpected_keys"]) and info["unexpected_keys"]
        unbiased = load_pretrained(tmp_path, balancing="aux_global").eval()  # drops the biases, as transformers
        assert "expert_bias" not in " ".join(unbiased.state_dict())
        torch.testing.assert_close(hf.eval()(ids).logits, unbiased(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(unbiased(ids).logits, model(ids).logits, atol=1e-3)


def test_a_checkpoint_without_biases_starts_them_at_zero(tiny_config, tmp_path):
    save_pretrained(JetMoeForCausalLM(tiny_config), tmp_path)
    model = load_pretrained(tmp_path, balancing="bias")
    assert all(torch.equal(r.expert_bias, torch.zeros(tiny_config.num_local_experts)) for r in model.routers())
