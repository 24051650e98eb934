import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import jetmoe.data.cache as cache
from jetmoe.data.datamodule import JetMoeDataModule, ResumableDataLoader, ShardedBatchSampler, WindowDataset

VOCAB = 320


def ready(cfg, **kwargs) -> JetMoeDataModule:
    dm = JetMoeDataModule(cfg, vocab_size=VOCAB, **kwargs)
    dm.setup("fit")
    return dm


def batch_indices(loader) -> list[list[int]]:
    return [list(batch) for batch in loader.batch_sampler]


# ----------------------------------------------------------------------------- setup and cache


def test_setup_exposes_tokenizer_and_stats(jsonl_config):
    dm = ready(jsonl_config)
    assert dm.tokenizer.token_to_id("</s>") == 2 and dm.tokenizer.get_vocab_size() <= VOCAB
    assert dm.tokenizer_path.name == "tokenizer.json" and dm.tokenizer_path.is_file()
    s = dm.stats
    assert s["train_documents"] + s["val_documents"] == 60 and s["val_documents"] == 3
    assert s["train_windows"] == len(dm.train_dataloader().dataset) and s["val_windows"] >= 1
    assert s["train_tokens"] > (s["train_windows"] - 1) * 32 and 0.9 < s["packing_efficiency"] <= 1.0
    assert s["from_cache"] is False


def test_second_setup_loads_the_cache_without_retraining_or_retokenizing(jsonl_config, monkeypatch):
    first = ready(jsonl_config)

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cache, "train_tokenizer", fail)
    monkeypatch.setattr(cache, "pack_documents", fail)
    monkeypatch.setattr(cache, "load_documents", fail)
    second = ready(jsonl_config)
    assert second.stats["from_cache"] is True
    assert second.tokenizer_path == first.tokenizer_path
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    np.testing.assert_array_equal(second.train_dataloader().dataset.input_ids_NT,
                                  first.train_dataloader().dataset.input_ids_NT)


def test_cache_key_covers_what_changes_the_tokens(jsonl_config):
    dm = JetMoeDataModule(jsonl_config, vocab_size=VOCAB)
    key = dm._cache_path()
    assert JetMoeDataModule(jsonl_config, vocab_size=VOCAB, seed=1)._cache_path() != key
    assert JetMoeDataModule(jsonl_config, vocab_size=VOCAB + 1)._cache_path() != key
    assert JetMoeDataModule(dataclasses.replace(jsonl_config, seq_len=64), vocab_size=VOCAB)._cache_path() != key
    assert JetMoeDataModule(dataclasses.replace(jsonl_config, batch_size=8), vocab_size=VOCAB)._cache_path() == key
    corpus = jsonl_config.data_files[0]
    with open(corpus, "a", encoding="utf-8") as f:
        f.write('{"text": "one more document"}\n')
    assert dm._cache_path() != key  # the file's size and mtime changed


def test_a_failed_build_publishes_nothing(jsonl_config, monkeypatch):
    real_pack = cache.pack_documents
    calls = []

    def crash_on_val(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while packing the val split
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(cache, "pack_documents", crash_on_val)
    dm = JetMoeDataModule(jsonl_config, vocab_size=VOCAB)
    with pytest.raises(KeyboardInterrupt):
        dm.setup()
    path = dm._cache_path()
    assert not path.exists() and list(path.parent.iterdir()) == [path.parent / "datasets"]
    monkeypatch.setattr(cache, "pack_documents", real_pack)
    assert ready(jsonl_config).stats["from_cache"] is False


def test_accepts_an_omegaconf_dict_config(jsonl_config):
    dm = JetMoeDataModule(OmegaConf.create(dataclasses.asdict(jsonl_config)), vocab_size=VOCAB)
    assert dm.cfg == jsonl_config


def test_special_ids_must_fit_the_vocab(jsonl_config):
    with pytest.raises(ValueError, match=r"eos_token_id must be in \[0, model.vocab_size=320\), got 320"):
        JetMoeDataModule(jsonl_config, vocab_size=VOCAB, eos_token_id=VOCAB)


def test_a_user_tokenizer_is_used_as_is(jsonl_config, tiny_tokenizer, tmp_path):
    path = tmp_path / "user_tokenizer.json"
    tiny_tokenizer.save(str(path))
    dm = JetMoeDataModule(dataclasses.replace(jsonl_config, tokenizer_path=str(path)), vocab_size=400)
    dm.setup()
    assert dm.tokenizer.to_str() == tiny_tokenizer.to_str()
    with pytest.raises(ValueError, match="data.tokenizer_path: file not found: .*missing.json"):
        JetMoeDataModule(dataclasses.replace(jsonl_config, tokenizer_path=str(tmp_path / "missing.json")),
                         vocab_size=400).setup()


# ----------------------------------------------------------------------------- batches


def test_batches_are_int64_windows_with_labels_and_document_positions(jsonl_config):
    dm = ready(jsonl_config)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert all(t.dtype == torch.int64 and t.shape[1] == 32 for t in batch.values())
        assert torch.equal(batch["labels"], batch["input_ids"])
        after_eos = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        after_eos[:, 1:] = batch["input_ids"][:, :-1] == 2
        assert (batch["position_ids"][after_eos] == 0).all() and (batch["position_ids"][:, 0] == 0).all()
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 4


def test_val_loader_covers_every_val_window_once_in_order(jsonl_config):
    dm = ready(jsonl_config)
    loader = dm.val_dataloader()
    assert sum(batch_indices(loader), []) == list(range(dm.stats["val_windows"]))


def test_eval_dataloader_packs_held_out_files_with_the_same_tokenizer(jsonl_config, tmp_path, make_docs):
    dm = ready(jsonl_config)
    held_out = make_docs(3, seed=99)
    for i, doc in enumerate(held_out):
        (tmp_path / f"held_out_{i}.py").write_text(doc, encoding="utf-8")
    ids = torch.cat([batch["input_ids"].reshape(-1) for batch in dm.eval_dataloader([str(tmp_path / "held_out_*.py")])])
    eos = (ids == 2).nonzero().flatten().tolist()
    assert dm.tokenizer.decode(ids[: eos[0]].tolist()) == held_out[0]
    assert dm.tokenizer.decode(ids[eos[0] + 1 : eos[1]].tolist()) == held_out[1]


def test_too_little_data_for_one_batch_is_a_clear_error(jsonl_config):
    dm = ready(dataclasses.replace(jsonl_config, batch_size=10_000))
    with pytest.raises(ValueError, match=r"the train split has \d+ windows of data.seq_len 32: too few for 1 rank"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------- shuffling, sharding, resume


def test_shuffling_is_reproducible_and_changes_every_epoch():
    a = ShardedBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    b = ShardedBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    assert list(a) == list(b) and len(a) == 12
    b.epoch = 1
    epoch1 = sum(list(b), [])
    assert list(a) != list(b) and len(set(epoch1)) == len(epoch1) == 96 and set(epoch1) <= set(range(100))


def test_ranks_get_disjoint_equal_shards_read_from_the_trainer(jsonl_config):
    dm = ready(dataclasses.replace(jsonl_config, batch_size=2))
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shards.append({"train": sum(batch_indices(dm.train_dataloader()), []),
                       "val": sum(batch_indices(dm.val_dataloader()), [])})
    for split in ("train", "val"):
        first, second = shards[0][split], shards[1][split]
        assert len(first) == len(second) > 0 and not set(first) & set(second)
    assert len(shards[0]["train"]) == dm.stats["train_windows"] // 2 // 2 * 2  # whole batches only


def test_lightning_sharding_on_top_is_refused(jsonl_config):
    dm = ready(jsonl_config)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2,
                                 _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def make_loader(num_windows: int = 22, batch_size: int = 4, num_workers: int = 0) -> ResumableDataLoader:
    ids = np.arange(num_windows * 3, dtype=np.uint16).reshape(num_windows, 3)
    sampler = ShardedBatchSampler(num_windows, batch_size, shuffle=True, drop_last=True, seed=0)
    return ResumableDataLoader(WindowDataset(ids, np.zeros_like(ids)), sampler, num_workers=num_workers)


def first_ids(batches) -> list[list[int]]:
    return [batch["input_ids"][:, 0].tolist() for batch in batches]


def test_loader_state_counts_consumed_batches_not_prefetched_ones():
    loader = make_loader(num_workers=2)  # workers prefetch 2 x 2 batches ahead
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(3)]
    assert loader.state_dict() == {"epoch": 0, "consumed": 3}

    resumed = make_loader()
    resumed.load_state_dict(loader.state_dict())
    uninterrupted = first_ids(make_loader())  # epoch 0, all 5 batches
    assert first_ids(consumed) + first_ids(resumed) == uninterrupted


def test_loader_rolls_over_to_the_next_epoch_after_a_full_pass():
    loader = make_loader()
    epoch0 = first_ids(loader)
    assert loader.state_dict() == {"epoch": 0, "consumed": 5}
    epoch1 = first_ids(loader)
    assert loader.state_dict() == {"epoch": 1, "consumed": 5} and epoch1 != epoch0
    assert len(set(sum(epoch1, []))) == 20  # 5 batches of distinct windows
