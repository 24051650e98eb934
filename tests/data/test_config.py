from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jetmoe.data.config import DataConfig, validate_data_config


def test_defaults_are_valid_and_work_as_a_structured_config():
    validate_data_config(DataConfig())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"data_files": ["a.txt"]}))
    assert isinstance(cfg, DataConfig) and cfg.data_files == ["a.txt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 0}, "data.seq_len must be a positive integer, got 0"),
        ({"batch_size": -2}, "data.batch_size must be a positive integer, got -2"),
        ({"max_chars": 0}, "data.max_chars must be a positive integer, got 0"),
        ({"tokenizer_train_chars": 1.5}, "data.tokenizer_train_chars must be a positive integer, got 1.5"),
        ({"val_fraction": 1.0}, r"data.val_fraction must be a number in \(0, 1\), got 1.0"),
        ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
        ({"source": "web"}, "data.source must be one of stdlib, files, hub, disk, got 'web'"),
        ({"text_split": "word"}, "data.text_split must be one of file, line, paragraph, got 'word'"),
        ({"source": "files"}, "data.data_files must list at least one path"),
        ({"source": "hub"}, "data.hub_name must be set"),
        ({"source": "disk"}, "data.disk_path must be set"),
        ({"text_field": ""}, "data.text_field must be a non-empty column name"),
        ({"cache_dir": ""}, "data.cache_dir must be a non-empty path"),
    ],
)
def test_invalid_fields_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_data_config(DataConfig(**overrides))


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.mark.parametrize(("name", "source"), [("stdlib", "stdlib"), ("text_files", "files")])
def test_shipped_yaml_files_merge_onto_the_schema(name, source):
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIGS / f"{name}.yaml"))
    cfg = OmegaConf.to_object(merged)
    validate_data_config(cfg)
    assert cfg.source == source
