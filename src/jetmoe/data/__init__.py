"""Data: named sources, byte-level BPE tokenizer, the prepared token store, weighted mixtures with phases and the
LightningDataModule (no model imports)."""

from jetmoe.data.config import DataConfig, PhaseConfig, SourceConfig, validate_data_config
from jetmoe.data.datamodule import (
    JetMoeDataModule, ResumableDataLoader, ShardedBatchSampler, WindowDataset, evaluation_batches,
)
from jetmoe.data.mixture import Mixture, phase_start_steps
from jetmoe.data.prepare import SourceSummary, open_store, prepare_store
from jetmoe.data.sources import iter_documents
from jetmoe.data.tokenizer import SpecialTokens, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "JetMoeDataModule",
    "Mixture",
    "PhaseConfig",
    "ResumableDataLoader",
    "ShardedBatchSampler",
    "SourceConfig",
    "SourceSummary",
    "SpecialTokens",
    "WindowDataset",
    "evaluation_batches",
    "iter_documents",
    "load_tokenizer",
    "open_store",
    "phase_start_steps",
    "prepare_store",
    "train_tokenizer",
    "validate_data_config",
]
