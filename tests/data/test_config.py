from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jetmoe.data.config import DataConfig, PhaseConfig, SourceConfig, validate_data_config
from jetmoe.errors import UserError


def config(**overrides) -> DataConfig:
    return DataConfig(**{"sources": {"code": SourceConfig()}, **overrides})


def test_defaults_are_valid_and_work_as_a_structured_config():
    validate_data_config(config())
    raw = {"sources": {"text": {"kind": "files", "data_files": ["a.txt"]}}, "phases": [{"start": "decay",
                                                                                       "weights": {"text": 2}}]}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))
    assert isinstance(cfg, DataConfig) and cfg.sources["text"].data_files == ["a.txt"]
    assert cfg.phases[0].start == "decay" and cfg.phases[0].weights == {"text": 2.0}


def source(**overrides) -> dict:
    return {"sources": {"web": SourceConfig(**overrides)}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 0}, "data.seq_len must be a positive integer, got 0"),
        ({"batch_size": -2}, "data.batch_size must be a positive integer, got -2"),
        ({"max_chars": 0}, "data.max_chars must be a positive integer, got 0"),
        ({"tokenizer_train_chars": 1.5}, "data.tokenizer_train_chars must be a positive integer, got 1.5"),
        ({"val_fraction": 0.6}, r"data.val_fraction must be a number in \(0, 0.5\], got 0.6"),
        ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
        ({"skip_batches": -5}, "data.skip_batches must be an integer >= 0, got -5"),
        ({"prepare_workers": 0}, "data.prepare_workers must be a positive integer, got 0"),
        ({"cache_dir": ""}, "data.cache_dir must be a non-empty path"),
        (source(kind="web"), "data.sources.web.kind must be one of stdlib, files, hub, disk, got 'web'"),
        (source(text_split="word"), "data.sources.web.text_split must be one of file, line, paragraph, got 'word'"),
        (source(kind="files"), "data.sources.web.data_files must list at least one path"),
        (source(kind="hub"), "data.sources.web.hub_name must be set"),
        (source(kind="disk"), "data.sources.web.disk_path must be set"),
        (source(text_field=""), "data.sources.web.text_field must be a non-empty column name"),
        ({"sources": {"a/b": SourceConfig()}}, "data.sources.a/b: a source name must be letters"),
        (source(weight=-1.0), "data.sources.web.weight must be a number >= 0, got -1.0"),
        (source(weight=0.0), r"data.sources: the weights \(web=0.0\) must sum to a positive number"),
        ({"sources": {"web": SourceConfig(), "code": SourceConfig(weight=0.0)}},
         "data.sources.code.weight is 0 and no data.phases entry gives it a weight"),
        ({"phases": [PhaseConfig(start=10, weights={"cod": 1.0})]},
         r"data.phases\[0\].weights: unknown source 'cod' \(sources: code\)"),
        ({"phases": [PhaseConfig(start=10, weights={"code": -1.0})]},
         r"data.phases\[0\].weights.code must be a number >= 0, got -1.0"),
        ({"phases": [PhaseConfig(start=10, weights={"code": 0.0})]},
         r"data.phases\[0\].weights must sum to a positive number"),
        ({"phases": [PhaseConfig(start="later", weights={"code": 1.0})]},
         r"data.phases\[0\].start must be a step \(int\), a fraction"),
        ({"phases": [PhaseConfig(start=1.5, weights={"code": 1.0})]},
         r"data.phases\[0\].start: a fraction of trainer.max_steps must be in \(0, 1\), got 1.5"),
        ({"phases": [PhaseConfig(start=0, weights={"code": 1.0})]}, r"data.phases\[0\].start must be after step 0"),
    ],
)
def test_invalid_fields_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        validate_data_config(config(**overrides))


def test_no_source_named_means_the_built_in_corpus():
    assert {n: s.kind for n, s in DataConfig().sources.items()} == {"stdlib": "stdlib"}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": {"web": {"kind": "hub",
                                                                                                "hub_name": "x"}}}))
    assert list(cfg.sources) == ["web"]


def test_a_source_used_only_from_a_phase_on_may_start_at_weight_0():
    cfg = config(sources={"web": SourceConfig(), "math": SourceConfig(weight=0.0)},
                 phases=[PhaseConfig(start="decay", weights={"web": 1.0, "math": 1.0})])
    validate_data_config(cfg)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.mark.parametrize(("name", "kinds"), [("stdlib", {"stdlib": "stdlib"}), ("text_files", {"text": "files"})])
def test_shipped_yaml_files_merge_onto_the_schema(name, kinds):
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIGS / f"{name}.yaml"))
    cfg = OmegaConf.to_object(merged)
    validate_data_config(cfg)
    assert {n: s.kind for n, s in cfg.sources.items()} == kinds
