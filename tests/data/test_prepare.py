"""`prepare_store`: streaming, deterministic for any worker count, resumable, and loud about damage."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import jetmoe.data.prepare as prepare
from jetmoe.data.prepare import open_store, prepare_store
from jetmoe.data.store import MANIFEST_FILE
from jetmoe.data.tokenizer import SpecialTokens
from jetmoe.errors import ConfigError, InputFileError, MissingFileError

VOCAB = 320
SPECIAL = SpecialTokens()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ~2,000 characters and shards of ~1,500 training tokens: many of both on a tiny corpus."""
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(prepare, "ENCODE_CHARS", 700)


def shard_config(cfg, tmp_path, name="store", **overrides):
    return dataclasses.replace(cfg, shard_tokens=1500, store_dir=str(tmp_path / name), **overrides)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_the_store_is_byte_identical_for_any_number_of_workers(two_source_config, tmp_path, small_chunks):
    stores = []
    for workers in (1, 3):
        cfg = shard_config(two_source_config, tmp_path, f"w{workers}", prepare_workers=workers)
        summaries = prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
        assert all(s.shards > 2 for s in summaries)
        stores.append(digests(tmp_path / f"w{workers}"))
    assert stores[0] == stores[1]


def test_shards_hold_the_sources_documents_with_eos_and_the_manifest_adds_up(two_source_config, tmp_path,
                                                                           small_chunks):
    cfg = shard_config(two_source_config, tmp_path)
    summaries = {s.name: s for s in prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)}
    store = open_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    code = store.sources["code"]
    assert code.manifest["documents"] == {"train": 57, "val": 3} and code.manifest["dtype"] == "uint16"
    for split, stream in code.splits.items():
        assert stream.num_tokens == code.manifest["tokens"][split] == summaries["code"].tokens[split]
        ids = stream.read(0, stream.num_tokens)
        assert (ids == SPECIAL.eos_token_id).sum() == code.manifest["documents"][split] and ids[-1] == 2
    docs = [json.loads(line)["text"] for line in Path(cfg.sources["code"].data_files[0]).read_text().splitlines()]
    ids = code.splits["train"].read(0, code.splits["train"].num_tokens)
    ends = np.flatnonzero(ids == 2)
    assert store.tokenizer.decode(ids[ends[9] + 1 : ends[10]].tolist()) == docs[11]  # doc 9 is held out
    assert summaries["code"].bytes > code.splits["train"].num_tokens * 2


def test_memory_holds_a_few_chunks_whatever_the_source_size(two_source_config, tmp_path, small_chunks, monkeypatch):
    alive, peak = [0], [0]
    real_chunks, real_encode = prepare.chunk_documents, prepare.encode_chunk

    def counted_chunks(docs, *args):
        for chunk in real_chunks(docs, *args):
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            yield chunk

    def encode(*args):
        result = real_encode(*args)
        alive[0] -= 1
        return result

    monkeypatch.setattr(prepare, "chunk_documents", counted_chunks)
    monkeypatch.setattr(prepare, "encode_chunk", encode)
    prepare_store(shard_config(two_source_config, tmp_path, prepare_workers=2), vocab_size=VOCAB, special=SPECIAL)
    assert 1 <= peak[0] <= 2 * 2 + 1


def test_a_killed_prepare_keeps_finished_shards_and_a_rerun_completes_identically(two_source_config, tmp_path,
                                                                                small_chunks, monkeypatch):
    clean = shard_config(two_source_config, tmp_path, "clean")
    prepare_store(clean, vocab_size=VOCAB, special=SPECIAL)
    cfg = shard_config(two_source_config, tmp_path, "killed")
    real_encode, calls = prepare.encode_chunk, []

    def dies_at_chunk_6(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        return real_encode(*args)

    monkeypatch.setattr(prepare, "encode_chunk", dies_at_chunk_6)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    web = next((tmp_path / "killed").glob("web-*"))
    kept = sorted(p.name for p in web.glob("shard-*.json"))
    assert kept and not (web / MANIFEST_FILE).exists() and not list(web.glob(".*.tmp"))
    with pytest.raises(MissingFileError, match="manifest.json: missing"):
        open_store(cfg, vocab_size=VOCAB, special=SPECIAL)

    calls.clear()
    monkeypatch.setattr(prepare, "encode_chunk", lambda *a: calls.append(1) or real_encode(*a))
    summaries = prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    assert summaries[0].built_shards < summaries[0].shards  # the finished shards were kept, not re-tokenized
    assert digests(tmp_path / "killed") == digests(tmp_path / "clean")


def test_a_truncated_or_missing_shard_is_named_and_prepare_rebuilds_only_it(two_source_config, tmp_path,
                                                                          small_chunks, monkeypatch):
    cfg = shard_config(two_source_config, tmp_path)
    prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    before = digests(tmp_path / "store")
    web = next((tmp_path / "store").glob("web-*"))
    shard = web / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputFileError, match=r"train-00001.bin: shard of source 'web' is truncated or damaged .* "
                                             r"rebuild it with jetmoe prepare"):
        open_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    shard.unlink()
    prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL, repair=False)  # what `jetmoe train` runs: no repair
    with pytest.raises(MissingFileError, match="train-00001.bin: shard of source 'web' is missing"):
        open_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    encoded = []
    real_encode = prepare.encode_chunk
    monkeypatch.setattr(prepare, "encode_chunk", lambda *a: encoded.append(1) or real_encode(*a))
    summaries = {s.name: s for s in prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)}
    record = json.loads((web / "shard-00001.json").read_text())
    assert summaries["web"].built_shards == 1 and summaries["code"].built_shards == 0
    assert len(encoded) == record["chunk_end"] - record["chunk_start"]  # only that shard's chunks re-tokenized
    assert digests(tmp_path / "store") == before


@pytest.mark.parametrize("damage", [b"{\"version\": 1, \"sha", b"\xff\xfe", b"[]"])
def test_a_damaged_manifest_is_written_again_from_the_intact_shards(two_source_config, tmp_path, small_chunks,
                                                                   monkeypatch, damage):
    cfg = shard_config(two_source_config, tmp_path)
    prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    before = digests(tmp_path / "store")
    manifest = next((tmp_path / "store").glob("web-*")) / MANIFEST_FILE
    manifest.write_bytes(damage)  # a disk error or a hand edit
    with pytest.raises(InputFileError, match="manifest.json: not (valid JSON|a manifest)"):
        prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL, repair=False)  # `jetmoe train` reports, never repairs
    encoded = []
    real_encode = prepare.encode_chunk
    monkeypatch.setattr(prepare, "encode_chunk", lambda *a: encoded.append(1) or real_encode(*a))
    summaries = {s.name: s for s in prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)}
    assert not encoded and summaries["web"].built_shards == 0  # every shard was intact: nothing re-tokenized
    assert digests(tmp_path / "store") == before


def test_changing_mixture_weights_keeps_the_tokenizer_and_the_store(two_source_config, tmp_path):
    """The BPE trains on equal shares of the sources, so a weight ablation is not a tokenizer ablation."""
    cfg = dataclasses.replace(two_source_config, store_dir=str(tmp_path / "store"))
    prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    before = digests(tmp_path / "store")
    reweighted = dataclasses.replace(cfg, store_dir=None, sources={
        "web": dataclasses.replace(cfg.sources["web"], weight=0.0), "code": cfg.sources["code"]})
    assert prepare.tokenizer_recipe(reweighted, VOCAB, SPECIAL).key == prepare.tokenizer_recipe(cfg, VOCAB, SPECIAL).key
    summaries = prepare_store(dataclasses.replace(reweighted, store_dir=cfg.store_dir), vocab_size=VOCAB,
                              special=SPECIAL)
    assert [s.built_shards for s in summaries] == [0, 0] and digests(tmp_path / "store") == before


def test_a_store_of_another_tokenizer_is_refused_and_kept(jsonl_config, tmp_path, tiny_tokenizer):
    cfg = dataclasses.replace(jsonl_config, store_dir=str(tmp_path / "store"))
    prepare_store(cfg, vocab_size=VOCAB, special=SPECIAL)
    before = digests(tmp_path / "store")
    with pytest.raises(ConfigError, match=r"data.store_dir .*store: prepared for another tokenizer \(a BPE of vocab "
                                          r"320 .*\), not this run's \(a BPE of vocab 400"):
        prepare_store(cfg, vocab_size=400, special=SPECIAL)
    path = tmp_path / "user.json"
    tiny_tokenizer.save(str(path))
    with pytest.raises(ConfigError, match=r"not this run's \(.*user.json \(sha256"):
        open_store(dataclasses.replace(cfg, tokenizer_path=str(path)), vocab_size=400, special=SPECIAL)
    assert digests(tmp_path / "store") == before


def test_a_source_copied_from_another_tokenizers_store_is_refused(jsonl_config, tmp_path):
    a = dataclasses.replace(jsonl_config, store_dir=str(tmp_path / "a"))
    prepare_store(a, vocab_size=VOCAB, special=SPECIAL)
    manifest_file = next((tmp_path / "a").glob("code-*")) / MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="source 'code' was prepared with tokenizer 000000000000"):
        open_store(a, vocab_size=VOCAB, special=SPECIAL)


def test_progress_lines_name_documents_rate_and_eta(jsonl_config, tmp_path, small_chunks, monkeypatch, caplog):
    monkeypatch.setattr(prepare, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="jetmoe.data"):
        prepare_store(shard_config(jsonl_config, tmp_path), vocab_size=VOCAB, special=SPECIAL)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare code: ")]
    assert any("documents" in line and "tokens/s" in line and "ETA" in line for line in lines)
    assert lines[-1].startswith("prepare code: done,") and "train + " in lines[-1] and "MB" in lines[-1]
