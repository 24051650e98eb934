import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import jetmoe.data.prepare as prepare
from jetmoe.data.config import PhaseConfig
from jetmoe.data.datamodule import JetMoeDataModule, ShardedBatchSampler, evaluation_batches
from jetmoe.errors import UserError

VOCAB = 320


def ready(cfg, **kwargs) -> JetMoeDataModule:
    dm = JetMoeDataModule(cfg, vocab_size=VOCAB, **kwargs)
    dm.setup("fit")
    return dm


def ids_of(loader, n=None) -> list[torch.Tensor]:
    batches = []
    for batch in loader:
        batches.append(batch["input_ids"])
        if n is not None and len(batches) == n:
            break
    return batches


# ----------------------------------------------------------------------------- setup and store


def test_setup_prepares_the_store_and_exposes_tokenizer_and_stats(jsonl_config):
    dm = ready(jsonl_config)
    assert dm.tokenizer.token_to_id("</s>") == 2 and dm.tokenizer.get_vocab_size() <= VOCAB
    assert dm.tokenizer_path.name == "tokenizer.json" and dm.tokenizer_path.is_file()
    s = dm.stats
    assert s["code/train_documents"] + s["code/val_documents"] == 60 and s["code/val_documents"] == 3
    assert s["code/train_windows"] == -(-s["code/train_tokens"] // 32) and s["code/val_windows"] >= 1
    assert s["from_cache"] is False
    assert len(dm.train_dataloader()) == s["code/train_windows"] // 4


def test_second_setup_opens_the_store_without_reading_or_tokenizing(jsonl_config, monkeypatch):
    first = ready(jsonl_config)

    def fail(*args, **kwargs):
        raise AssertionError("the prepared store should have been used")

    monkeypatch.setattr(prepare, "train_tokenizer", fail)
    monkeypatch.setattr(prepare, "encode_chunk", fail)
    monkeypatch.setattr(prepare, "iter_documents", fail)
    second = ready(jsonl_config)
    assert second.stats["from_cache"] is True and second.tokenizer_path == first.tokenizer_path
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert torch.equal(ids_of(second.train_dataloader(), 1)[0], ids_of(first.train_dataloader(), 1)[0])


def test_store_location_follows_what_changes_the_tokens(jsonl_config):
    def root_and_source(cfg, vocab=VOCAB):
        dm = JetMoeDataModule(cfg, vocab_size=vocab)
        dm.setup()
        return dm.stats["store"], dm._store.sources["code"].path

    store, source = root_and_source(jsonl_config)
    assert root_and_source(dataclasses.replace(jsonl_config, seq_len=64, batch_size=8)) == (store, source)
    other_vocab = root_and_source(jsonl_config, VOCAB + 30)
    assert other_vocab[0] != store  # another BPE: another store
    corpus = jsonl_config.sources["code"].data_files[0]
    with open(corpus, "a", encoding="utf-8") as f:
        f.write('{"text": "one more document"}\n')
    assert root_and_source(jsonl_config)[0] != store  # the BPE trains on the files: their size and mtime changed


def test_accepts_an_omegaconf_dict_config(jsonl_config):
    dm = JetMoeDataModule(OmegaConf.structured(jsonl_config), vocab_size=VOCAB)
    assert dm.cfg == jsonl_config


def test_special_ids_must_fit_the_vocab(jsonl_config):
    with pytest.raises(UserError, match=r"eos_token_id must be in \[0, model.vocab_size=320\), got 320"):
        JetMoeDataModule(jsonl_config, vocab_size=VOCAB, eos_token_id=VOCAB)


def test_a_user_tokenizer_is_used_as_is(jsonl_config, tiny_tokenizer, tmp_path):
    path = tmp_path / "user_tokenizer.json"
    tiny_tokenizer.save(str(path))
    dm = JetMoeDataModule(dataclasses.replace(jsonl_config, tokenizer_path=str(path)), vocab_size=400)
    dm.setup()
    assert dm.tokenizer.to_str() == tiny_tokenizer.to_str()
    with pytest.raises(UserError, match="data.tokenizer_path: file not found: .*missing.json"):
        JetMoeDataModule(dataclasses.replace(jsonl_config, tokenizer_path=str(tmp_path / "missing.json")),
                         vocab_size=400).setup()


# ----------------------------------------------------------------------------- batches


def test_batches_are_int64_windows_with_labels_and_document_positions(jsonl_config):
    dm = ready(jsonl_config)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert all(t.dtype == torch.int64 and t.shape == (4, 32) for t in batch.values())
        assert torch.equal(batch["labels"], batch["input_ids"])
        after_eos = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        after_eos[:, 1:] = batch["input_ids"][:, :-1] == 2
        assert (batch["position_ids"][after_eos] == 0).all() and (batch["position_ids"][:, 0] == 0).all()
        steps = batch["position_ids"][:, 1:] - batch["position_ids"][:, :-1]
        assert ((steps == 1) | after_eos[:, 1:]).all()


def test_windows_hold_the_documents_in_order_separated_by_eos(jsonl_config, make_docs):
    dm = ready(jsonl_config)
    stream = dm._store.sources["code"].splits["train"]
    ids = stream.read(0, stream.num_tokens)
    eos = np.flatnonzero(ids == 2)
    train_docs = [d for i, d in enumerate(make_docs(60)) if i not in (9, 29, 49)]  # every 20th held out
    assert len(eos) == len(train_docs) and eos[-1] == len(ids) - 1
    assert dm.tokenizer.decode(ids[: eos[0]].tolist()) == train_docs[0]
    assert dm.tokenizer.decode(ids[eos[0] + 1 : eos[1]].tolist()) == train_docs[1]


def test_val_loader_covers_every_val_window_once_in_order(jsonl_config):
    dm = ready(jsonl_config)
    stream = dm._store.sources["code"].splits["val"]
    got = torch.cat(ids_of(dm.val_dataloader())).numpy()
    expected = np.stack([stream.read(j * 32, 32) for j in range(stream.num_windows(32))])
    assert np.array_equal(got, expected)


def test_evaluation_batches_score_every_token_once_with_document_positions(jsonl_config, make_docs):
    dm = ready(jsonl_config)
    held_out = make_docs(3, seed=99)
    batches = evaluation_batches(dm.tokenizer, held_out, seq_len=32, batch_size=4, eos_token_id=2)
    ids = torch.cat([batch["input_ids"].reshape(-1) for batch in batches])
    eos = (ids == 2).nonzero().flatten().tolist()
    assert len(eos) == 3 and eos[-1] == len(ids) - 1  # every document, no token repeated or dropped
    assert [dm.tokenizer.decode(ids[a + 1 : b].tolist()) for a, b in zip([-1, *eos], eos)] == held_out
    assert all(len(b["input_ids"]) <= 4 for b in batches) and batches[-1]["input_ids"].shape[1] <= 32
    for batch in batches:
        assert torch.equal(batch["labels"], batch["input_ids"]) and (batch["position_ids"][:, 0] == 0).all()


def test_too_little_data_for_one_batch_is_a_clear_error(jsonl_config):
    dm = ready(dataclasses.replace(jsonl_config, batch_size=10_000))
    with pytest.raises(UserError, match=r"the train split has \d+ windows of data.seq_len 32: too few for 1 rank"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------- mixture, sharding, resume


def source_of_rows(dm, loader_batches: int) -> np.ndarray:
    return np.concatenate([dm.train_loader.dataset.window_ids(b)[0] for b in range(loader_batches)])


def test_two_sources_are_drawn_by_weight_and_switch_at_the_phase(two_source_config):
    cfg = dataclasses.replace(two_source_config, phases=[PhaseConfig(start=10, weights={"code": 1.0})])
    dm = ready(cfg)
    loader = dm.train_dataloader()
    sources = source_of_rows(dm, 14).reshape(14, 4)
    assert np.bincount(sources[:10].ravel(), minlength=2).tolist() == [30, 10]  # web 3 : code 1
    assert (sources[10:] == 1).all()  # only code from step 10 on
    ids = ids_of(loader, 12)
    web = dm._store.sources["web"].splits["train"]
    first_web_window = dm.train_loader.dataset.window_ids(0)[1][0]
    assert torch.equal(ids[0][0], torch.from_numpy(web.read(int(first_web_window) * 32, 32).astype(np.int64)))
    assert dm.mixture.shares(0, 10) == {"web": 0.75, "code": 0.25}


def test_ranks_get_disjoint_rows_read_from_the_trainer(two_source_config):
    dm = ready(dataclasses.replace(two_source_config, batch_size=2))
    rows = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        rows.append([tuple(zip(*loader.dataset.window_ids(b))) for b in range(5)])
        val = list(dm.val_dataloader().batch_sampler)
        rows[-1].append(sum(val, []))
    for b in range(5):
        assert not set(rows[0][b]) & set(rows[1][b])  # (source, window) pairs differ within a step
    assert not set(rows[0][5]) & set(rows[1][5]) and len(rows[0][5]) == len(rows[1][5]) > 0


def test_lightning_sharding_on_top_is_refused(jsonl_config):
    dm = ready(jsonl_config)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2,
                                 _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(UserError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_loader_state_counts_consumed_batches_not_prefetched_ones(two_source_config):
    dm = ready(dataclasses.replace(two_source_config, num_workers=2))  # workers prefetch 2 x 2 batches ahead
    loader = dm.train_dataloader()
    iterator = iter(loader)
    consumed = [next(iterator)["input_ids"] for _ in range(3)]
    assert loader.state_dict() == {"batches": 3}
    resumed = JetMoeDataModule(two_source_config, vocab_size=VOCAB)
    resumed.setup()
    again = resumed.train_dataloader()
    again.load_state_dict(loader.state_dict())
    uninterrupted = ids_of(dm.train_dataloader(), 6)
    assert all(torch.equal(a, b) for a, b in zip(consumed + ids_of(again, 3), uninterrupted))


def test_skip_batches_continues_another_runs_data_stream(two_source_config):
    uninterrupted = ids_of(ready(two_source_config).train_dataloader(), 5)
    skipping = ready(dataclasses.replace(two_source_config, skip_batches=3)).train_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(ids_of(skipping, 2), uninterrupted[3:]))
    assert skipping.state_dict() == {"batches": 5}  # a resume restores the position, skip included


def test_loader_rolls_over_to_the_next_epoch_after_a_full_pass(jsonl_config):
    dm = ready(jsonl_config)
    loader = dm.train_dataloader()
    epoch0 = ids_of(loader)
    assert loader.state_dict() == {"batches": len(loader)}
    epoch1 = ids_of(loader)
    assert loader.state_dict() == {"batches": 2 * len(loader)} and len(epoch1) == len(epoch0)
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))  # another permutation of the windows


def test_sharded_batch_sampler_splits_windows_evenly_in_order():
    assert list(ShardedBatchSampler(10, 3)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert list(ShardedBatchSampler(10, 3, rank=1, world_size=2)) == [[5, 6, 7], [8, 9]]
