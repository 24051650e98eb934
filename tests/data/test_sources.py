from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jetmoe.data.config import SourceConfig
from jetmoe.data.sources import (
    MIN_DOCUMENTS,
    iter_documents,
    split_documents,
    stdlib_files,
    stdlib_root,
)
from jetmoe.errors import UserError


def read(src: SourceConfig, tmp_path: Path, max_chars=None) -> list[str]:
    return list(iter_documents(src, max_chars=max_chars, cache_dir=str(tmp_path / "cache"), where="data.sources.x"))


def files_source(*files: Path, **overrides) -> SourceConfig:
    return SourceConfig(kind="files", data_files=[str(f) for f in files], **overrides)


# ----------------------------------------------------------------------------- each source


def test_text_files_give_one_document_per_file_through_a_glob(tmp_path, make_docs):
    docs = make_docs(25)
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.py").write_text(doc, encoding="utf-8")
    assert read(files_source(tmp_path / "*.py"), tmp_path) == docs


@pytest.mark.parametrize("text_split", ["line", "paragraph"])
def test_text_split_by_line_or_paragraph(tmp_path, text_split):
    paragraphs = [f"p{i} first\np{i} second" for i in range(MIN_DOCUMENTS)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    docs = read(files_source(tmp_path / "notes.txt", text_split=text_split), tmp_path)
    lines = [line for p in paragraphs for line in p.splitlines()]
    assert [d.strip() for d in docs] == (lines if text_split == "line" else paragraphs)


def test_jsonl_parquet_and_disk_rows_use_text_field(tmp_path, make_docs, write_jsonl):
    docs = make_docs(30)
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs[:10], field="content")
    pq.write_table(pa.table({"content": docs[10:20], "n": list(range(10))}), tmp_path / "b.parquet")
    assert read(files_source(jsonl, tmp_path / "b.parquet", text_field="content"), tmp_path) == docs[:20]

    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    assert read(SourceConfig(kind="disk", disk_path=str(tmp_path / "ds"), text_field="content"), tmp_path) == docs


def test_disk_dataset_dict_uses_hub_split(tmp_path, make_docs):
    docs = make_docs(30)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                               "other": datasets.Dataset.from_dict({"text": docs[:3]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = SourceConfig(kind="disk", disk_path=str(tmp_path / "dd"), hub_split="train")
    assert read(src, tmp_path) == docs
    src.hub_split = "test"
    with pytest.raises(UserError, match="hub_split 'test' is not a split of .*available: train, other"):
        read(src, tmp_path)


def test_hub_source_streams_a_local_directory_through_load_dataset(tmp_path, make_docs, write_jsonl):
    docs = make_docs(30)
    (tmp_path / "hubdir").mkdir()
    write_jsonl(tmp_path / "hubdir" / "part-0.jsonl", docs[:15])
    write_jsonl(tmp_path / "hubdir" / "part-1.jsonl", docs[15:])
    assert read(SourceConfig(kind="hub", hub_name=str(tmp_path / "hubdir")), tmp_path) == docs


def test_a_hub_dataset_that_cannot_be_streamed_is_named(tmp_path):
    with pytest.raises(UserError, match=r"data.sources.x.hub_name '.*nowhere': cannot be streamed: Couldn't find"):
        read(SourceConfig(kind="hub", hub_name=str(tmp_path / "nowhere")), tmp_path)


def test_hub_source_calls_load_dataset_streaming_with_name_config_split(tmp_path, monkeypatch, make_docs):
    docs = make_docs(25)
    calls = []

    def fake_load_dataset(name, config, *, split, streaming, cache_dir):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = SourceConfig(kind="hub", hub_name="org/corpus", hub_config="en", hub_split="train")
    assert read(src, tmp_path) == docs
    assert calls == [("org/corpus", "en", "train", True)]


def test_stdlib_corpus_skips_tests_and_site_packages_and_caps_chars(tmp_path):
    files = stdlib_files()
    parts = {part for f in files for part in f.relative_to(stdlib_root()).parts[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert files == sorted(files) and any(f.name == "os.py" for f in files)
    assert len(stdlib_files(include_tests=True)) > len(files)

    docs = read(SourceConfig(), tmp_path, max_chars=50_000)
    assert sum(map(len, docs)) == 50_000
    assert docs == read(SourceConfig(), tmp_path, max_chars=50_000)  # deterministic


# ----------------------------------------------------------------------------- clear errors


def test_missing_file_and_unmatched_glob_are_named(tmp_path):
    with pytest.raises(UserError, match="file not found: .*missing.txt"):
        read(files_source(tmp_path / "missing.txt"), tmp_path)
    with pytest.raises(UserError, match=r"pattern '.*\*.md' matches no files"):
        read(files_source(tmp_path / "*.md"), tmp_path)


def test_empty_and_blank_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty.txt: file is empty"):
        read(files_source(tmp_path / "empty.txt"), tmp_path)
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(UserError, match="blank.txt: contains no text"):
        read(files_source(tmp_path / "blank.txt"), tmp_path)


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00\x01 latin-1 caf\xe9", b"PK\x03\x04\x00\x00\x00binary"])
def test_binary_text_file_must_be_utf8(tmp_path, payload):
    (tmp_path / "blob.txt").write_bytes(payload)
    with pytest.raises(UserError, match="blob.txt: .*must be UTF-8 text"):
        read(files_source(tmp_path / "blob.txt"), tmp_path)


def test_missing_text_field_lists_the_columns(tmp_path, write_jsonl):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ["x", "y"], field="body")
    with pytest.raises(UserError, match=r"'text' is not a column of .*rows.jsonl; available columns: body, id"):
        read(files_source(jsonl), tmp_path)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
    with pytest.raises(UserError, match=r"'text' is not a column of .*rows.parquet; available columns: body"):
        read(files_source(tmp_path / "rows.parquet"), tmp_path)


def test_non_string_text_field_is_rejected(tmp_path, write_jsonl):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ["x", "y"])
    with pytest.raises(UserError, match="text_field 'id' of .*rows.jsonl must be a string column"):
        read(files_source(jsonl, text_field="id"), tmp_path)


# ----------------------------------------------------------------------------- split


def held_out(docs, val_fraction):
    return [i for i, (is_val, _) in enumerate(split_documents(docs, val_fraction, "x"))]


def test_split_holds_out_documents_spread_evenly_through_the_source(make_docs):
    docs = make_docs(100)
    split = list(split_documents(docs, 0.05, "x"))
    assert [doc for _, doc in split] == docs  # source order, nothing lost
    assert [i for i, (is_val, _) in enumerate(split) if is_val] == [9, 29, 49, 69, 89]
    assert sum(is_val for is_val, _ in split_documents(docs, 0.1, "x")) == 10


def test_split_keeps_at_least_one_val_and_one_train_document():
    assert [is_val for is_val, _ in split_documents(["a", "b"], 0.01, "x")] == [False, True]
    assert [is_val for is_val, _ in split_documents(["a", "b", "c"], 0.5, "x")] == [True, False, True]
    with pytest.raises(UserError, match="x: 1 document.* at least 2"):
        list(split_documents(["a"], 0.1, "x"))


def test_one_big_text_file_is_cut_into_blocks_of_lines_with_a_val_split(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(3000))
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    blocks = read(files_source(tmp_path / "play.txt"), tmp_path)
    assert len(blocks) >= MIN_DOCUMENTS and "".join(blocks) == text
    assert all(block.endswith("\n") for block in blocks)
    assert 1 <= sum(is_val for is_val, _ in split_documents(blocks, 0.05, "x")) < len(blocks)


def test_a_long_text_file_streams_in_blocks_of_lines(tmp_path, monkeypatch):
    import jetmoe.data.sources as sources

    monkeypatch.setattr(sources, "LONG_TEXT_CHARS", 1000)
    monkeypatch.setattr(sources, "TEXT_BLOCK_CHARS", 300)
    monkeypatch.setattr(sources, "READ_BYTES", 64)  # lines and UTF-8 characters straddle the reads
    text = "".join(f"ligne {i}: être ou ne pas être\n" for i in range(2000))
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    blocks = read(files_source(tmp_path / "long.txt"), tmp_path)
    assert "".join(blocks) == text and len(blocks) > MIN_DOCUMENTS
    assert all(300 <= len(b) < 340 for b in blocks[:-1])


def test_compressed_jsonl_rows_are_read(tmp_path, make_docs, write_jsonl):
    import gzip

    docs = make_docs(25)
    plain = write_jsonl(tmp_path / "rows.jsonl", docs)
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert read(files_source(tmp_path / "rows.jsonl.gz"), tmp_path) == docs
