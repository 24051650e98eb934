"""A completed HF directory works in transformers with nothing written by hand: AutoTokenizer with its special
tokens, AutoModelForCausalLM, GenerationConfig, pipeline("text-generation") stopping at EOS, a parsable model card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from jetmoe import JetMoeConfig, JetMoeForCausalLM, save_pretrained
from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer
from jetmoe.errors import InputFileError, MissingFileError
from jetmoe.figures import curves_figure, save_png
from jetmoe.hf_export import CardMetric, ModelCard, complete_hf_dir

transformers = pytest.importorskip("transformers")
CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "import os\nx = os.sep\n"] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(CODE, 300, SpecialTokens()).save(str(path))
    return path


def eos_always_model(config: JetMoeConfig) -> JetMoeForCausalLM:
    """Every layer's output projections are zero, so the hidden state is the (normalised) token embedding; every
    embedding points along dimension 0, EOS's ten times further: EOS has the largest logit after any token."""
    model = JetMoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.layers."):
                param.zero_()
        embed = model.model.embed_tokens.weight
        embed.normal_(0, 0.01)
        embed[:, 0] = 1.0
        embed[config.eos_token_id] = 0
        embed[config.eos_token_id, 0] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_file):
    config = JetMoeConfig.from_name("test", vocab_size=300, pad_token_id=0)
    directory = tmp_path_factory.mktemp("hf")
    save_pretrained(eos_always_model(config), directory)
    figure = save_png(curves_figure([{"title": "t", "ylabel": "y", "series": {"a": ([0, 1], [1, 2])}}]),
                      tmp_path_factory.mktemp("fig") / "loss.png")
    card = ModelCard(name="unit", metrics=[CardMetric("stdlib_next_line", "acc", 0.31, "next line", "accuracy", "me")],
                     figures={"Training loss": figure}, training={"optimizer steps": 10}, training_config="a: 1\n")
    written = complete_hf_dir(directory, config, tokenizer_file, card)
    assert {path.name for path in written} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                               "generation_config.json", "README.md", "loss.png"}
    return directory


def test_auto_tokenizer_knows_the_special_tokens(hf_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    text = "def add(a, b):\n    return  a + b ,\n"
    ids = tokenizer(text).input_ids
    assert 1 not in ids and 2 not in ids  # no BOS / EOS added: training text has none
    assert tokenizer.decode(ids) == text  # spaces kept as they are
    assert tokenizer.model_max_length == 256
    assert json.loads((hf_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_generation_config_and_pipeline_stop_at_eos(hf_dir):
    config = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.max_length) == (1, 2, 0, 256)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer("def add", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == [2]  # one token, EOS, then it stops
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert generator("def add", max_new_tokens=12)[0]["generated_text"] == "def add"
    unstopped = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)  # EOS ignored
    assert unstopped.shape[1] == ids.shape[1] + 12


def test_model_card_follows_the_hf_convention(hf_dir):
    text = (hf_dir / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"] == {"name": "next line", "type": "stdlib_next_line"}
    assert result["metrics"] == [{"type": "acc", "value": 0.31, "name": "accuracy"}]
    assert body.startswith("\n# unit") and "## Training procedure" in body and "| optimizer steps | 10 |" in body
    assert "![Training loss](figures/loss.png)" in body and (hf_dir / "figures" / "loss.png").is_file()
    assert "AutoModelForCausalLM.from_pretrained(path)" in body


def test_a_bare_directory_gets_a_minimal_card(tmp_path, tokenizer_file):
    config = JetMoeConfig.from_name("test", vocab_size=300, pad_token_id=0)
    complete_hf_dir(tmp_path, config, tokenizer_file)
    meta = yaml.safe_load((tmp_path / "README.md").read_text().split("---\n")[1])
    assert "model-index" not in meta and meta["tags"][0] == "jetmoe"
    complete_hf_dir(tmp_path, config)  # the tokenizer.json already there
    with pytest.raises(MissingFileError, match="tokenizer file not found"):
        complete_hf_dir(tmp_path / "other", config)
    with pytest.raises(InputFileError, match="no token at pad_token_id 299"):
        complete_hf_dir(tmp_path, config.replace(pad_token_id=299), tokenizer_file)
