"""Data: corpus sources, byte-level BPE tokenizer, packing, cache and the LightningDataModule (no model imports)."""

from jetmoe.data.config import DataConfig, validate_data_config
from jetmoe.data.datamodule import JetMoeDataModule, ResumableDataLoader, ShardedBatchSampler, WindowDataset
from jetmoe.data.packing import PackedWindows, pack_documents
from jetmoe.data.sources import load_documents
from jetmoe.data.tokenizer import SpecialTokens, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "JetMoeDataModule",
    "PackedWindows",
    "ResumableDataLoader",
    "ShardedBatchSampler",
    "SpecialTokens",
    "WindowDataset",
    "load_documents",
    "load_tokenizer",
    "pack_documents",
    "train_tokenizer",
    "validate_data_config",
]
