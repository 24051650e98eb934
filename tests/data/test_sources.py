from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jetmoe.data.config import DataConfig
from jetmoe.data.sources import (
    MIN_DOCUMENTS,
    cut_small_corpus,
    load_documents,
    read_corpus,
    split_documents,
    stdlib_files,
    stdlib_root,
)


def files_config(tmp_path: Path, *files: Path, **overrides) -> DataConfig:
    paths = [str(f) for f in files]
    return DataConfig(source="files", data_files=paths, cache_dir=str(tmp_path / "cache"), **overrides)


# ----------------------------------------------------------------------------- each source


def test_text_files_give_one_document_per_file_through_a_glob(tmp_path, make_docs):
    docs = make_docs(25)
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.py").write_text(doc, encoding="utf-8")
    assert read_corpus(files_config(tmp_path, tmp_path / "*.py")) == docs


@pytest.mark.parametrize("text_split", ["line", "paragraph"])
def test_text_split_by_line_or_paragraph(tmp_path, text_split):
    paragraphs = [f"p{i} first\np{i} second" for i in range(MIN_DOCUMENTS)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    docs = read_corpus(files_config(tmp_path, tmp_path / "notes.txt", text_split=text_split))
    lines = [line for p in paragraphs for line in p.splitlines()]
    assert [d.strip() for d in docs] == (lines if text_split == "line" else paragraphs)


def test_jsonl_parquet_and_disk_rows_use_text_field(tmp_path, make_docs, write_jsonl):
    docs = make_docs(30)
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs[:10], field="content")
    pq.write_table(pa.table({"content": docs[10:20], "n": list(range(10))}), tmp_path / "b.parquet")
    cfg = files_config(tmp_path, jsonl, tmp_path / "b.parquet", text_field="content")
    assert read_corpus(cfg) == docs[:20]

    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    disk = DataConfig(source="disk", disk_path=str(tmp_path / "ds"), text_field="content",
                      cache_dir=str(tmp_path / "c"))
    assert read_corpus(disk) == docs


def test_disk_dataset_dict_uses_hub_split(tmp_path, make_docs):
    docs = make_docs(30)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                               "other": datasets.Dataset.from_dict({"text": docs[:3]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(source="disk", disk_path=str(tmp_path / "dd"), hub_split="train", cache_dir=str(tmp_path / "c"))
    assert read_corpus(cfg) == docs
    cfg.hub_split = "test"
    with pytest.raises(ValueError, match="'test' is not a split of .*available: train, other"):
        read_corpus(cfg)


def test_hub_source_calls_load_dataset_with_name_config_split(tmp_path, monkeypatch, make_docs):
    docs = make_docs(25)
    calls = []

    def fake_load_dataset(name, config, *, split, cache_dir):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hub", hub_name="org/corpus", hub_config="en", hub_split="train[:1%]",
                     cache_dir=str(tmp_path))
    assert read_corpus(cfg) == docs
    assert calls == [("org/corpus", "en", "train[:1%]")]


def test_stdlib_corpus_skips_tests_and_site_packages_and_caps_chars(tmp_path):
    files = stdlib_files()
    parts = {part for f in files for part in f.relative_to(stdlib_root()).parts[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert files == sorted(files) and any(f.name == "os.py" for f in files)
    assert len(stdlib_files(include_tests=True)) > len(files)

    docs = read_corpus(DataConfig(max_chars=50_000, cache_dir=str(tmp_path)))
    assert sum(map(len, docs)) == 50_000
    assert docs == read_corpus(DataConfig(max_chars=50_000, cache_dir=str(tmp_path)))  # deterministic


# ----------------------------------------------------------------------------- clear errors


def test_missing_file_and_unmatched_glob_are_named(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*missing.txt"):
        read_corpus(files_config(tmp_path, tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"pattern '.*\*.md' matches no files"):
        read_corpus(files_config(tmp_path, tmp_path / "*.md"))


def test_empty_and_blank_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        read_corpus(files_config(tmp_path, tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(ValueError, match="blank.txt: contains no text"):
        read_corpus(files_config(tmp_path, tmp_path / "blank.txt"))


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00\x01 latin-1 caf\xe9", b"PK\x03\x04\x00\x00\x00binary"])
def test_binary_text_file_must_be_utf8(tmp_path, payload):
    (tmp_path / "blob.txt").write_bytes(payload)
    with pytest.raises(ValueError, match="blob.txt: .*must be UTF-8 text"):
        read_corpus(files_config(tmp_path, tmp_path / "blob.txt"))


def test_missing_text_field_lists_the_columns(tmp_path, write_jsonl):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ["x", "y"], field="body")
    with pytest.raises(ValueError, match=r"'text' is not a column of .*rows.jsonl; available columns: body, id"):
        read_corpus(files_config(tmp_path, jsonl))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"'text' is not a column of .*rows.parquet; available columns: body"):
        read_corpus(files_config(tmp_path, tmp_path / "rows.parquet"))


def test_non_string_text_field_is_rejected(tmp_path, write_jsonl):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ["x", "y"])
    with pytest.raises(ValueError, match="text_field 'id' of .*rows.jsonl must be a string column"):
        read_corpus(files_config(tmp_path, jsonl, text_field="id"))


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete(make_docs):
    docs = make_docs(100)
    train, val = split_documents(docs, val_fraction=0.1, seed=7)
    assert (train, val) == split_documents(docs, val_fraction=0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == sorted(docs)
    assert val != split_documents(docs, val_fraction=0.1, seed=8)[1]


def test_split_keeps_at_least_one_val_and_one_train_document():
    assert [len(part) for part in split_documents(["a", "b"], val_fraction=0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split_documents(["a", "b", "c"], val_fraction=0.99, seed=0)] == [1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["a"], val_fraction=0.1, seed=0)


def test_one_big_text_file_is_cut_into_blocks_of_lines_with_a_val_split(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(3000))
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    cfg = files_config(tmp_path, tmp_path / "play.txt")
    blocks = read_corpus(cfg)
    assert len(blocks) >= MIN_DOCUMENTS and "".join(blocks) == text
    assert all(block.endswith("\n") for block in blocks)
    train, val = load_documents(cfg, seed=0)
    assert len(val) >= 1 and sorted(train + val) == sorted(blocks)
