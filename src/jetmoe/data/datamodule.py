"""JetMoeDataModule: cached corpus -> packed windows -> reproducible, resumable, rank-sharded batches.

A batch is a dict of int64 tensors ``[B, T]``: ``input_ids``, ``labels`` (the same ids; the model shifts) and
``position_ids`` (0 at every document start).

* Tokenization happens once: ``prepare_data()`` builds the cache (see `jetmoe.data.cache`), ``setup()`` loads it.
* Sharding: the samplers here split every epoch across ranks themselves (``trainer.global_rank`` /
  ``trainer.world_size``), each rank a disjoint, equally sized slice, so **create the Trainer with
  ``use_distributed_sampler=False``** (otherwise Lightning would shard a second time; this is checked).
* Resume: the train loader is stateful (``state_dict()`` = epoch and batches consumed). Lightning's fit loop stores
  it in checkpoints and loads it before iterating again, so training resumes at exactly the next batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from jetmoe.data.cache import TOKENIZER_FILE, Corpus, build_corpus, cache_path, is_built, load_corpus
from jetmoe.data.config import DataConfig, validate_data_config
from jetmoe.data.packing import pack_documents
from jetmoe.data.sources import read_files, resolve_files
from jetmoe.data.tokenizer import SpecialTokens

Batch = dict[str, torch.Tensor]


class WindowDataset(Dataset):
    """Packed windows as int64 tensors `[T]`: input_ids, labels (= input_ids), position_ids."""

    def __init__(self, input_ids_NT: np.ndarray, position_ids_NT: np.ndarray):
        self.input_ids_NT = input_ids_NT
        self.position_ids_NT = position_ids_NT

    def __len__(self) -> int:
        return len(self.input_ids_NT)

    def __getitem__(self, i: int) -> Batch:
        input_ids_T = torch.from_numpy(self.input_ids_NT[i].astype(np.int64))
        position_ids_T = torch.from_numpy(self.position_ids_NT[i].astype(np.int64))
        return {"input_ids": input_ids_T, "labels": input_ids_T, "position_ids": position_ids_T}


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of window indices for one rank.

    Each epoch orders the windows by a permutation seeded with (seed, epoch) (or 0..N-1 without shuffle) and gives
    rank r the r-th of `world_size` equal contiguous slices (the remainder is left out), then cuts it into batches.
    Iteration starts at batch `start` of epoch `epoch`; `ResumableDataLoader` sets both.
    """

    def __init__(
        self, num_windows: int, batch_size: int, *, shuffle: bool, drop_last: bool,
        seed: int = 0, rank: int = 0, world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_windows, self.batch_size = num_windows, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = num_windows // world_size
        self.epoch = 0
        self.start = 0

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
        else:
            order = np.arange(self.num_windows)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __len__(self) -> int:
        full, partial = divmod(self.per_rank, self.batch_size)
        return full + int(partial > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.rank_indices(self.epoch)
        for b in range(self.start, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ShardedBatchSampler that records (epoch, batches consumed) for exact resume.

    `consumed` counts batches handed to the caller (not those prefetched by workers). Iterating continues where the
    last iteration stopped; once an epoch is used up, the next iteration starts the next epoch. A data epoch is thus
    independent of Lightning's epoch counter (e.g. with `limit_train_batches`, no window repeats before all are seen).
    """

    batch_sampler: ShardedBatchSampler

    def __init__(self, dataset: Dataset, batch_sampler: ShardedBatchSampler, num_workers: int = 0):
        super().__init__(
            dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        self.epoch = 0
        self.consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
        self.batch_sampler.epoch, self.batch_sampler.start = self.epoch, self.consumed
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class JetMoeDataModule(L.LightningDataModule):
    """Corpus -> tokenizer -> packed windows -> batches. See the module docstring (Trainer requirements)."""

    def __init__(
        self, cfg: DataConfig | DictConfig, *, vocab_size: int,
        bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0, seed: int = 0,
    ):
        super().__init__()
        self.cfg = _as_data_config(cfg)
        validate_data_config(self.cfg)
        self.vocab_size = vocab_size
        self.special = SpecialTokens(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        for name, token_id in dataclasses.asdict(self.special).items():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} must be in [0, model.vocab_size={vocab_size}), got {token_id}")
        self.seed = seed
        self.tokenizer: Optional[Tokenizer] = None
        self.tokenizer_path: Optional[Path] = None
        self.stats: dict[str, Any] = {}
        self._built_here = False  # this process built the cache (stats["from_cache"] is False)
        self._corpus: Optional[Corpus] = None

    def _cache_path(self) -> Path:
        return cache_path(self.cfg, vocab_size=self.vocab_size, special=self.special, seed=self.seed)

    def prepare_data(self) -> None:
        """Build the cache unless it exists (Lightning calls this on one process per node)."""
        path = self._cache_path()
        if not is_built(path):
            build_corpus(self.cfg, path, vocab_size=self.vocab_size, special=self.special, seed=self.seed)
            self._built_here = True

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the cache (building it first when prepare_data was not called). Idempotent."""
        if self._corpus is not None:
            return
        self.prepare_data()
        self._corpus = load_corpus(self._cache_path())
        self.tokenizer = self._corpus.tokenizer
        self.tokenizer_path = self._corpus.path / TOKENIZER_FILE
        self.stats = {**self._corpus.stats, "from_cache": not self._built_here}

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self._dataset("train")
        sampler = self._sampler(len(dataset), "train", shuffle=True, drop_last=True)
        return ResumableDataLoader(dataset, sampler, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("val"), "val")

    def eval_dataloader(self, paths: Sequence[str]) -> DataLoader:
        """Held-out text files (paths or globs, read like `source: files`) packed with this tokenizer, in order."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before eval_dataloader()")
        docs = read_files(resolve_files(paths), self.cfg.text_field, self.cfg.text_split, self.cfg.cache_dir)
        packed = pack_documents(self.tokenizer, docs, self.cfg.seq_len, self.special.eos_token_id, self.vocab_size)
        return self._eval_loader(WindowDataset(packed.input_ids, packed.position_ids), "eval")

    # ------------------------------------------------------------------------- helpers

    def _dataset(self, split: str) -> WindowDataset:
        if self._corpus is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        windows = self._corpus.windows[split]
        return WindowDataset(windows["input_ids"], windows["position_ids"])

    def _eval_loader(self, dataset: WindowDataset, split: str) -> DataLoader:
        sampler = self._sampler(len(dataset), split, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers)

    def _sampler(self, num_windows: int, split: str, *, shuffle: bool, drop_last: bool) -> ShardedBatchSampler:
        rank, world_size = self._rank_and_world_size()
        sampler = ShardedBatchSampler(
            num_windows, self.cfg.batch_size, shuffle=shuffle, drop_last=drop_last,
            seed=self.seed, rank=rank, world_size=world_size,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"the {split} split has {num_windows} windows of data.seq_len {self.cfg.seq_len}: too few for "
                f"{world_size} rank(s) x data.batch_size {self.cfg.batch_size}; lower them or add data"
            )
        return sampler

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        connector = getattr(self.trainer, "_accelerator_connector", None)  # Lightning's own sharding switch
        if self.trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "JetMoeDataModule shards batches by rank itself: create the Trainer with use_distributed_sampler=False"
            )
        return self.trainer.global_rank, self.trainer.world_size


def _as_data_config(cfg: DataConfig | DictConfig) -> DataConfig:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig or an omegaconf DictConfig, got {type(cfg).__name__}")
    return cfg
