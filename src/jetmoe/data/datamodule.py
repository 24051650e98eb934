"""JetMoeDataModule: token store -> windows drawn from weighted sources -> resumable, rank-sharded batches.

A batch is a dict of int64 tensors ``[B, T]``: ``input_ids``, ``labels`` (the same ids; the model shifts) and
``position_ids`` (0 at every document start: after each EOS and at the window start).

* Tokenization happens once: ``prepare_data()`` prepares the store when it is missing (`jetmoe.data.prepare`),
  ``setup()`` memory-maps it.
* Training batches are a pure function of the batch index (`jetmoe.data.mixture`): windows drawn by the
  mixture weights of the current phase, every rank its own disjoint rows. **Create the Trainer with
  ``use_distributed_sampler=False``** (otherwise Lightning would shard a second time; this is checked).
* Resume: the train loader's ``state_dict()`` is the number of batches consumed. Lightning's fit loop stores it in
  checkpoints and loads it before iterating again, so training resumes at exactly the next batch.
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

from jetmoe.data.config import DataConfig, validate_data_config
from jetmoe.data.mixture import Mixture, build_phases, phase_start_steps
from jetmoe.data.packing import document_position_ids
from jetmoe.data.prepare import Store, encode_chunk, open_store, prepare_store
from jetmoe.data.store import TokenStream
from jetmoe.data.tokenizer import SpecialTokens
from jetmoe.errors import ConfigError

Batch = dict[str, torch.Tensor]


def make_batch(input_ids_NT: np.ndarray, eos_token_id: int) -> Batch:
    """int64 input_ids, labels (the same tensor) and document position_ids of [N, T] windows."""
    input_ids_NT = torch.from_numpy(input_ids_NT.astype(np.int64))
    position_ids_NT = torch.from_numpy(document_position_ids(input_ids_NT.numpy(), eos_token_id).astype(np.int64))
    return {"input_ids": input_ids_NT, "labels": input_ids_NT, "position_ids": position_ids_NT}


def evaluation_batches(
    tokenizer: Tokenizer, docs: Sequence[str], *, seq_len: int, batch_size: int, eos_token_id: int
) -> list[Batch]:
    """Documents (EOS after each, as in training) cut into consecutive windows of `seq_len` tokens, the last one
    shorter, so that every token but a window's first is scored exactly once; `batch_size` windows a batch."""
    stream, _ = encode_chunk(tokenizer, [(False, doc) for doc in docs], eos_token_id, np.dtype(np.int64))["train"]
    full = len(stream) // seq_len * seq_len
    windows_NT = stream[:full].reshape(-1, seq_len)
    batches = [make_batch(windows_NT[i : i + batch_size], eos_token_id) for i in range(0, len(windows_NT), batch_size)]
    if len(stream) - full >= 2:  # the tail window, if it has a token to score
        batches.append(make_batch(stream[full:][None], eos_token_id))
    return batches


class WindowDataset(Dataset):
    """Windows `[T]` one at a time (validation, evaluation): `windows[i]` is window i's ids."""

    def __init__(self, windows: Sequence[np.ndarray], eos_token_id: int):
        self.windows, self.eos_token_id = windows, eos_token_id

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Batch:
        return {k: v[0] for k, v in make_batch(np.asarray(self.windows[i])[None], self.eos_token_id).items()}


class InterleavedWindows:
    """Every window of several streams once, the streams interleaved evenly: window k of a stream of N windows
    sits at (k + 1/2) / N of the way through (ties in stream order). A prefix samples every source."""

    def __init__(self, streams: Sequence[TokenStream], seq_len: int):
        self.streams, self.seq_len = streams, seq_len
        counts = [s.num_windows(seq_len) for s in streams]
        source = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(counts)])
        window = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        position = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
        order = np.lexsort((source, position))
        self.source, self.window = source[order], window[order]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.streams[self.source[i]].read(int(self.window[i]) * self.seq_len, self.seq_len)


class TrainBatches(Dataset):
    """Item b is this rank's rows of training batch b (see `jetmoe.data.mixture.Mixture`).

    ``len()`` is a nominal epoch: the batches that hold as many windows as the sources have.
    """

    def __init__(self, streams: Sequence[TokenStream], mixture: Mixture, *, seq_len: int, batch_size: int,
                 rank: int, eos_token_id: int, batches_per_epoch: int):
        self.streams, self.mixture = streams, mixture
        self.seq_len, self.batch_size, self.rank = seq_len, batch_size, rank
        self.eos_token_id, self.batches_per_epoch = eos_token_id, batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def window_ids(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) of each row of this rank's part of `batch`."""
        return self.mixture.windows(batch, self.rank * self.batch_size, self.batch_size)

    def __getitem__(self, batch: int) -> Batch:
        source, window = self.window_ids(batch)
        ids_NT = np.stack([self.streams[s].read(int(w) * self.seq_len, self.seq_len) for s, w in zip(source, window)])
        return make_batch(ids_NT, self.eos_token_id)


class _BatchRange(Sampler[int]):
    """Batch indices [start, end); its length is a whole epoch (Lightning's epoch size)."""

    def __init__(self, epoch_length: int):
        self.epoch_length, self.start, self.end = epoch_length, 0, epoch_length

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))


class ResumableDataLoader(DataLoader):
    """Training batches in order, recording how many were consumed (`state_dict`) for exact resume.

    `batches` counts batches handed to the caller (not those prefetched by workers). Each iteration runs to the end
    of the current nominal epoch; a data epoch is thus independent of Lightning's epoch counter.
    """

    dataset: TrainBatches

    def __init__(self, dataset: TrainBatches, num_workers: int = 0):
        self._range = _BatchRange(len(dataset))
        super().__init__(dataset, batch_size=None, sampler=self._range, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available())
        self.batches = 0

    def __iter__(self) -> Iterator[Batch]:
        epoch_length = len(self.dataset)
        self._range.start, self._range.end = self.batches, (self.batches // epoch_length + 1) * epoch_length
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = state["batches"]


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of window indices 0..N-1 in order for one rank: rank r takes the r-th of `world_size` equal
    contiguous slices (the remainder is left out when there are several ranks)."""

    def __init__(self, num_windows: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.rank = batch_size, rank
        self.per_rank = num_windows // world_size

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        first = self.rank * self.per_rank
        for b in range(len(self)):
            start = first + b * self.batch_size
            yield list(range(start, min(start + self.batch_size, first + self.per_rank)))


class JetMoeDataModule(L.LightningDataModule):
    """Store -> mixture -> batches. See the module docstring (Trainer requirements).

    `phase_steps`: the optimizer step at which each of ``cfg.phases`` starts, as resolved against the schedule by
    `jetmoe.data.mixture.phase_start_steps` (default: resolved here, which takes only absolute steps).
    """

    def __init__(
        self, cfg: DataConfig | DictConfig, *, vocab_size: int,
        bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0, seed: int = 0,
        phase_steps: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.cfg = _as_data_config(cfg)
        validate_data_config(self.cfg)
        self.vocab_size = vocab_size
        self.special = SpecialTokens(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        for name, token_id in dataclasses.asdict(self.special).items():
            if not 0 <= token_id < vocab_size:
                raise ConfigError(f"{name} must be in [0, model.vocab_size={vocab_size}), got {token_id}")
        self.seed = seed
        self.phases = build_phases(self.cfg, phase_start_steps(self.cfg) if phase_steps is None else phase_steps)
        self.source_names = list(self.cfg.sources)
        self.tokenizer: Optional[Tokenizer] = None
        self.tokenizer_path: Optional[Path] = None
        self.stats: dict[str, Any] = {}
        self.mixture: Optional[Mixture] = None
        self.train_loader: Optional[ResumableDataLoader] = None
        self._built_shards = 0  # shards this process tokenized (stats["from_cache"] is True when none)
        self._store: Optional[Store] = None

    def prepare_data(self) -> None:
        """Prepare the store's missing sources (Lightning calls this on one process per node)."""
        summaries = prepare_store(self.cfg, vocab_size=self.vocab_size, special=self.special, repair=False)
        self._built_shards += sum(s.built_shards for s in summaries)

    def setup(self, stage: Optional[str] = None) -> None:
        """Open the store (preparing it first when prepare_data was not called). Idempotent."""
        if self._store is not None:
            return
        self.prepare_data()
        self._store = open_store(self.cfg, vocab_size=self.vocab_size, special=self.special)
        self.tokenizer, self.tokenizer_path = self._store.tokenizer, self._store.tokenizer_path
        self.stats = {"from_cache": self._built_shards == 0, "store": str(self._store.root)}
        for name, src in self._store.sources.items():
            for split, stream in src.splits.items():
                self.stats[f"{name}/{split}_documents"] = src.manifest["documents"][split]
                self.stats[f"{name}/{split}_tokens"] = stream.num_tokens
                self.stats[f"{name}/{split}_windows"] = stream.num_windows(self.cfg.seq_len)

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world_size = self._rank_and_world_size()
        streams = self._streams("train")
        windows = sum(s.num_windows(self.cfg.seq_len) for s in streams)
        global_batch = self.cfg.batch_size * world_size
        if windows < global_batch:
            raise ConfigError(
                f"the train split has {windows} windows of data.seq_len {self.cfg.seq_len}: too few for "
                f"{world_size} rank(s) x data.batch_size {self.cfg.batch_size}; lower them or add data"
            )
        batches_per_step = getattr(self.trainer, "accumulate_grad_batches", 1)  # phases start at optimizer steps
        self.mixture = Mixture(self.source_names, [s.num_windows(self.cfg.seq_len) for s in streams], self.phases,
                               global_batch=global_batch, batches_per_step=batches_per_step, seed=self.seed)
        dataset = TrainBatches(streams, self.mixture, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size,
                               rank=rank, eos_token_id=self.special.eos_token_id,
                               batches_per_epoch=windows // global_batch)
        self.train_loader = ResumableDataLoader(dataset, num_workers=self.cfg.num_workers)
        self.train_loader.batches = self.cfg.skip_batches  # a resumed run's loader state replaces it
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(InterleavedWindows(self._streams("val"), self.cfg.seq_len), "val")

    # ------------------------------------------------------------------------- helpers

    def _streams(self, split: str) -> list[TokenStream]:
        if self._store is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return [self._store.sources[name].splits[split] for name in self.source_names]

    def _eval_loader(self, windows: Sequence[np.ndarray], split: str) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = ShardedBatchSampler(len(windows), self.cfg.batch_size, rank=rank, world_size=world_size)
        if len(sampler) == 0:
            raise ConfigError(
                f"the {split} split has {len(windows)} windows of data.seq_len {self.cfg.seq_len}: too few for "
                f"{world_size} rank(s); lower data.seq_len or add data"
            )
        dataset = WindowDataset(windows, self.special.eos_token_id)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        connector = getattr(self.trainer, "_accelerator_connector", None)  # Lightning's own sharding switch
        if self.trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ConfigError(
                "JetMoeDataModule shards batches by rank itself: create the Trainer with use_distributed_sampler=False"
            )
        return self.trainer.global_rank, self.trainer.world_size


def _as_data_config(cfg: DataConfig | DictConfig) -> DataConfig:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig or an omegaconf DictConfig, got {type(cfg).__name__}")
    return cfg
