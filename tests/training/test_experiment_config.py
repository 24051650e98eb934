"""Experiment composition: shipped YAMLs, overrides, and one-line errors naming their source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jetmoe.errors import MissingFileError
from jetmoe.training.config import (
    ConfigError,
    ExperimentConfig,
    find_configs_dir,
    from_dict,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]
# Experiment configs; sweep specs (a top-level `base:`, see jetmoe.training.sweep) live alongside them.
EXPERIMENTS = [p for p in sorted((REPO / "experiments").glob("*.yaml")) if "base" not in yaml.safe_load(p.read_text())]


def test_every_shipped_experiment_composes():
    names = {p.stem for p in EXPERIMENTS}
    assert {"default", "shakespeare", "jetmoe_8b", "finetune"} <= names
    for path in EXPERIMENTS:
        if path.stem == "finetune":
            continue  # needs an HF directory: see test_finetune_*
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig)
        assert cfg.run.name == path.stem


def test_default_experiment_is_a_small_moa_moe_on_stdlib():
    cfg = load_config(REPO / "experiments/default.yaml")
    m = cfg.model
    assert (m.num_local_experts, m.num_experts_per_tok) == (8, 2)
    assert {name: src.kind for name, src in cfg.data.sources.items()} == {"stdlib": "stdlib"}
    assert cfg.optim.schedule == "wsd" and cfg.optim.min_lr_ratio == 0.1
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    from jetmoe.training.config import build_model_config

    assert 1e6 < build_model_config(m).num_parameters()["total"] < 2e7


def test_jetmoe_8b_is_the_paper_recipe():
    cfg = load_config(REPO / "experiments/jetmoe_8b.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.trainer
    assert (m.num_hidden_layers, m.hidden_size, m.num_local_experts, m.num_experts_per_tok) == (24, 2048, 8, 2)
    assert (m.num_key_value_heads, m.kv_channels, m.intermediate_size, m.vocab_size) == (16, 128, 5632, 32000)
    assert cfg.data.seq_len == 4096
    assert (o.lr, o.weight_decay, o.grad_clip, o.schedule, o.min_lr_ratio) == (5e-4, 0.1, 1.0, "wsd", 0.1)
    assert t.precision == "bf16-mixed" and t.accelerator == "gpu"
    from jetmoe.training.config import build_model_config

    params = build_model_config(m).num_parameters()
    assert 8.0e9 < params["total"] < 9.0e9 and 2.0e9 < params["active"] < 2.5e9


def test_overrides_and_group_swaps_apply_in_order():
    cfg = load_config(REPO / "experiments/default.yaml", ["model=tiny", "optim.lr=1e-2", "optim.betas=[0.8,0.9]"])
    assert cfg.model.hidden_size == 64  # configs/model/tiny.yaml
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.trainer.max_steps == load_config(REPO / "experiments/default.yaml").trainer.max_steps


def test_round_trip_through_a_plain_dict():
    cfg = load_config(REPO / "experiments/default.yaml")
    raw = to_dict(cfg)
    json.dumps(raw)  # plain containers only
    assert from_dict(raw) == cfg


def test_configs_dir_is_found_above_the_experiment(tmp_path):
    (tmp_path / "configs/model").mkdir(parents=True)
    (tmp_path / "configs/model/mine.yaml").write_text("hidden_size: 96\nkv_channels: 16\n")
    (tmp_path / "exp").mkdir()
    exp = tmp_path / "exp/e.yaml"
    exp.write_text("defaults:\n  - model: mine\n")
    assert find_configs_dir(exp) == tmp_path / "configs"
    assert load_config(exp).model.hidden_size == 96


@pytest.fixture
def experiment(tmp_path):
    """Write an experiment next to a copy of the shipped configs; returns its path."""

    def write(body: str, name: str = "exp.yaml") -> Path:
        configs = tmp_path / "configs"
        if not configs.exists():
            configs.symlink_to(REPO / "configs")
        path = tmp_path / "experiments" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
        return path

    return write


BASE = "defaults:\n  - model: tiny\n  - trainer: cpu\n"


@pytest.mark.parametrize(
    ("body", "overrides", "message"),
    [
        (BASE + "model:\n  hiden_size: 3\n", [],
         r"experiments/exp.yaml: unknown key 'model.hiden_size' \(did you mean 'model.hidden_size'\?\)"),
        (BASE + "modle: {}\n", [], r"experiments/exp.yaml: unknown key 'modle'"),
        (BASE + "model: 3\n", [], r"experiments/exp.yaml: 'model' must be a mapping of model settings, got 3"),
        (BASE, ["optim.lrr=1"], r"command line: unknown key 'optim.lrr'"),
        (BASE + "model:\n  hidden_size: big\n", [], r"exp.yaml: 'model.hidden_size' expects int, got 'big'"),
        (BASE, ["trainer.devices=[1]"], r"command line: 'trainer.devices' expects int or str"),
        (BASE, ["model.init_from=[1]"], r"'model.init_from' expects str or null"),
        (BASE + "model:\n  num_experts_per_tok: 5\n", [],
         r"^model.num_experts_per_tok \(5\) must be <= num_local_experts \(4\)$"),
        (BASE + "data:\n  seq_len: 512\n", [],
         r"^data.seq_len \(512\) must be <= model.max_position_embeddings \(256\)$"),
        (BASE, ["optim.schedule=linear"], r"optim.schedule must be one of wsd, cosine, constant"),
        (BASE, ["trainer.max_steps=100", "optim.warmup_steps=95"], r"optim.warmup_steps \(95\) runs into the WSD decay"),
        (BASE, ["trainer.log_every_n_steps=3", "run.expert_log_every_n_steps=10"],
         r"run.expert_log_every_n_steps \(10\) must be a positive multiple of trainer.log_every_n_steps \(3\)"),
        (BASE, ["model.kv_channels=15"], r"model.kv_channels must be even"),
        (BASE, ["data.sources.stdlib.kind=web"], r"data.sources.stdlib.kind must be one of"),
        (BASE, ["data.phases=[{start: decay, weights: {stdlib: 1}}]", "optim.schedule=cosine"],
         r"data.phases\[0\].start 'decay' needs optim.schedule 'wsd'"),
        (BASE, ["trainer.max_steps=100", "optim.warmup_steps=10", "data.phases=[{start: 90, weights: {stdlib: 1}}, {start: 0.5, weights: {stdlib: 2}}]"],
         r"data.phases\[1\].start \(0.5 = step 50\) must come after data.phases\[0\] \(step 90\)"),
        (BASE, ["trainer.precision=16-mixed"], r"trainer.precision must be one of"),
        (BASE, ["trainer.expert_parallel=2"], r"^trainer.expert_parallel \(2\) needs trainer.strategy=fsdp, got 'auto'$"),
        (BASE, ["trainer.strategy=fsdp", "trainer.expert_parallel=3"],
         r"^trainer.expert_parallel \(3\) must divide model.num_local_experts \(4\)$"),
        (BASE, ["trainer.expert_parallel=0"], r"^trainer.expert_parallel must be > 0, got 0$"),
        (BASE, ["trainer.expert_parallel_attention=true"],
         r"^trainer.expert_parallel_attention needs trainer.expert_parallel > 1, got 1$"),
        (BASE, ["trainer.accelerator=gpus"], r"^trainer.accelerator must be one of auto, cpu, gpu, cuda, mps, tpu"),
        (BASE, ["trainer.devices=0"], r"^trainer.devices must be a number of devices > 0, -1 \(all\), auto, or comma-"),
        (BASE, ["trainer.devices=0,0"], r"^trainer.devices must be .* such as '0,1', got '0,0'$"),
        (BASE, ["model=huge"], r"command line: no config 'model: huge'"),
        (BASE, ["lr"], r"command line: override 'lr' is not key=value"),
        ("defaults:\n  - modle: tiny\n", [], r"exp.yaml: defaults: unknown group 'modle'"),
        ("defaults: tiny\n", [], r"exp.yaml: 'defaults' must be a list"),
        ("- model\n- tiny\n", [], r"exp.yaml: expected a mapping of config keys, got a list"),
        ("just a sentence\n", [], r"exp.yaml: expected a mapping of config keys, got a str"),
        ("model: [\n", [], r"exp.yaml: invalid YAML \(line 2\)"),
        (BASE + "model:\n  init_from: ???\n", [], r"missing required value 'model.init_from'"),
        (BASE, ["model.router_force_uniform=2"], r"command line: 'model.router_force_uniform' expects bool, got 2"),
        (BASE, ["model.balancing=aux"], r"^model.balancing must be one of aux_global, aux_per_router, bias, none, got 'aux'$"),
        (BASE, ["model.capacity_factor=0"], r"^model.capacity_factor must be a positive number or null \(dropless\), got 0"),
        (BASE, ["model.bias_update_rate=-0.1"], r"^model.bias_update_rate must be a non-negative number, got -0.1$"),
        (BASE + "run:\n  expert_metrics: 0\n", [], r"exp.yaml: 'run.expert_metrics' expects bool, got 0"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(experiment, body, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(experiment(body), overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("devices", ["1", "8", "-1", "auto", "0,1", "'1,'"])
def test_lightnings_forms_of_devices_are_accepted(experiment, devices):
    """A count, -1 (all), auto, or comma-separated device indices: what Lightning's Trainer takes as ``devices``."""
    load_config(experiment(BASE), [f"trainer.devices={devices}"])


def test_error_in_a_group_file_names_that_file(tmp_path):
    (tmp_path / "configs/optim").mkdir(parents=True)
    (tmp_path / "configs/optim/bad.yaml").write_text("lr: 1e-3\nwarmup: 10\n")
    exp = tmp_path / "e.yaml"
    exp.write_text("defaults:\n  - optim: bad\n")
    with pytest.raises(ConfigError, match=r"configs/optim/bad.yaml: unknown key 'optim.warmup'"):
        load_config(exp)


def test_missing_experiment_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("no/such/experiment.yaml")


def test_finetune_adopts_the_pretrained_architecture(tmp_path):
    from jetmoe.config import JetMoeConfig

    hf = tmp_path / "hf"
    hf.mkdir()
    pretrained = JetMoeConfig.from_name("test", vocab_size=300, pad_token_id=0)
    (hf / "config.json").write_text(json.dumps(pretrained.to_dict()))
    cfg = load_config(REPO / "experiments/finetune.yaml", [f"model.init_from={hf}", "model.aux_loss_coef=0.02"])
    assert (cfg.model.vocab_size, cfg.model.hidden_size) == (300, pretrained.hidden_size)
    assert cfg.model.aux_loss_coef == 0.02  # a training field keeps its configured value
    assert cfg.data.tokenizer_path == f"{hf}/tokenizer.json"


def test_finetune_requires_init_from(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required value 'model.init_from'"):
        load_config(REPO / "experiments/finetune.yaml")
    with pytest.raises(FileNotFoundError, match=r"model.init_from: .*config.json: missing"):
        load_config(REPO / "experiments/finetune.yaml", [f"model.init_from={tmp_path}"])


@pytest.fixture
def dense_run(tmp_path):
    """Write a run directory whose hf/config.json is a dense model (one expert) shaped like configs/model/tiny.yaml,
    with `changes`; returns the run directory."""
    from jetmoe.config import JetMoeConfig

    def write(**changes) -> Path:
        fields = {"vocab_size": 512, "pad_token_id": 0, "num_local_experts": 1, "num_experts_per_tok": 1, **changes}
        (tmp_path / "dense/hf").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dense/hf/config.json").write_text(json.dumps(JetMoeConfig.from_name("test", **fields).to_dict()))
        return tmp_path / "dense"

    return write


def test_upcycle_from_a_run_directory_means_its_hf_export(experiment, dense_run):
    run = dense_run()
    body = BASE + "data:\n  tokenizer_path: ${model.upcycle_from}/tokenizer.json\n"
    cfg = load_config(experiment(body), [f"model.upcycle_from={run}", "model.upcycle_noise=0.01"])
    assert cfg.model.upcycle_from == str(run / "hf") and cfg.model.upcycle_noise == 0.01
    assert cfg.data.tokenizer_path == f"{run}/hf/tokenizer.json"  # the dense model's tokenizer
    assert (cfg.model.num_local_experts, cfg.model.num_experts_per_tok) == (4, 2)  # the experiment's, not the source's
    assert load_config(experiment(BASE), [f"model.upcycle_from={run}/hf"]).model.upcycle_from == str(run / "hf")


@pytest.mark.parametrize(
    ("dense", "overrides", "error", "message"),
    [
        ({}, ["model.upcycle_noise=-0.1"], ConfigError,
         r"^model.upcycle_noise must be >= 0 \(0: exact copies\), got -0.1$"),
        ({}, ["model.init_from={run}/hf"], ConfigError, r"^model.upcycle_from and model.init_from exclude each other"),
        ({}, ["trainer.strategy=fsdp"], ConfigError,
         r"^model.upcycle_from is not supported with trainer.strategy=fsdp yet$"),
        ({}, ["model.upcycle_from={run}/nope"], MissingFileError,
         r"^model.upcycle_from: .*/dense/nope is neither a run directory \(with hf/\) nor a model directory"),
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, [], ConfigError,
         r"^model.upcycle_from: .*/dense/hf is an MoE model \(num_local_experts=8\); upcycling starts from a dense "
         r"model \(num_local_experts=1\)$"),
        ({"hidden_size": 32}, [], ConfigError,
         r"^model.upcycle_from: .*/dense/hf has hidden_size=32, but the upcycled model has hidden_size=64$"),
        ({"vocab_size": 300}, [], ConfigError, r"^model.upcycle_from: .* has vocab_size=300, but .* vocab_size=512$"),
        ({"num_hidden_layers": 3}, [], ConfigError,
         r"^model.upcycle_from: .* has num_hidden_layers=3, but .* num_hidden_layers=2$"),
        ({"num_key_value_heads": 4}, [], ConfigError,
         r"^model.upcycle_from: .* has num_key_value_heads=4, but .* num_key_value_heads=2$"),
        ({"kv_channels": 8}, [], ConfigError, r"^model.upcycle_from: .* has kv_channels=8, but .* kv_channels=16$"),
        ({"intermediate_size": 128}, [], ConfigError,
         r"^model.upcycle_from: .* has intermediate_size=128, but .* intermediate_size=64$"),
        ({"tie_word_embeddings": False}, [], ConfigError,
         r"^model.upcycle_from: .* has tie_word_embeddings=False, but .* tie_word_embeddings=True$"),
    ],
)
def test_upcycle_errors_are_one_line_naming_the_key(experiment, dense_run, dense, overrides, error, message):
    run = dense_run(**dense)
    with pytest.raises(error, match=message) as info:
        load_config(experiment(BASE), [f"model.upcycle_from={run}", *(o.format(run=run) for o in overrides)])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value, balancing", [("true", "aux_per_router"), ("false", "aux_global")])
def test_the_replaced_aux_loss_per_router_key_still_works(experiment, value, balancing):
    assert load_config(experiment(BASE), [f"model.aux_loss_per_router={value}"]).model.balancing == balancing
    body = BASE + f"model:\n  aux_loss_per_router: {value}\n"
    assert load_config(experiment(body)).model.balancing == balancing
