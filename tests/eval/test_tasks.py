"""Task files, datasets tables and the built-in task: items as written, and one-line errors naming the file and line."""

from __future__ import annotations

import json

import pytest

from jetmoe.data.sources import stdlib_files
from jetmoe.errors import ConfigError, InputFileError, MissingFileError, UserError
from jetmoe.eval.tasks import TaskConfig, load_task, read_datasets_task, read_jsonl_task, stdlib_next_line

GOOD = [
    {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
    {"context": "The sky is", "choices": ["green", "blue", "loud"], "label": "blue"},
    {"context": "", "choices": ["a", "b"], "label": "1"},
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_items_labels_as_index_digits_or_text(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), json.dumps(GOOD[2])])
    task = read_jsonl_task(path, "t")
    assert [item.label for item in task.items] == [0, 1, 1]
    assert task.items[1].choices == ("green", "blue", "loud")
    assert task.target_delimiter == " " and task.chance == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert len(read_jsonl_task(path, "t", limit=2).items) == 2


def test_write_jsonl_round_trips(tmp_path):
    task = read_jsonl_task(write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in GOOD]), "t")
    again = read_jsonl_task(task.write_jsonl(tmp_path / "copy.jsonl"), "t")
    assert again.items == task.items


def test_custom_field_names(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"q": "1 + 1 =", "opts": ["2", "3"], "answer": 0})])
    task = load_task(TaskConfig(name="t", path=str(path), context_field="q", choices_field="opts", label_field="answer",
                                target_delimiter=""))
    assert task.items[0].context == "1 + 1 =" and task.target_delimiter == ""


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "label": 0', r"t.jsonl:2: not valid JSON"),
    ('["context", "choices"]', r"t.jsonl:2: expected a JSON object"),
    ('{"context": "a", "label": 0}', r"t.jsonl:2: no 'choices' field"),
    ('{"context": "a", "choices": ["x"], "label": 0}', r"t.jsonl:2: 'choices' must be a list of at least 2"),
    ('{"context": "a", "choices": ["x", ""], "label": 0}', r"t.jsonl:2: 'choices' must be a list of at least 2"),
    ('{"context": 3, "choices": ["x", "y"], "label": 0}', r"t.jsonl:2: 'context' must be a string"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', r"t.jsonl:2: 'label' 2 is outside the 2 choices \(0..1\)"),
    ('{"context": "a", "choices": ["x", "y"], "label": -1}', r"t.jsonl:2: 'label' -1 is outside the 2 choices"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', r"t.jsonl:2: 'label' must be a choice index"),
    ('{"context": "a", "choices": ["x", "y"], "label": "z"}', r"t.jsonl:2: 'label' must be a choice index"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD[0]), line])
    with pytest.raises(InputFileError, match=message) as err:
        read_jsonl_task(path, "t")
    assert "\n" not in str(err.value)


def test_missing_empty_and_undecodable_files(tmp_path):
    with pytest.raises(MissingFileError, match=r"downstream task 't': .*nope.jsonl: file not found"):
        read_jsonl_task(tmp_path / "nope.jsonl", "t")
    with pytest.raises(InputFileError, match="no items"):
        read_jsonl_task(write_lines(tmp_path / "blank.jsonl", ["", "  "]), "t")
    (tmp_path / "bad.jsonl").write_bytes(b'{"context": "\xff"}\n')
    with pytest.raises(InputFileError, match="not UTF-8"):
        read_jsonl_task(tmp_path / "bad.jsonl", "t")


def test_datasets_table_from_a_local_directory(tmp_path):
    """The `hub_name` path through `datasets.load_dataset`, on a local directory (no network)."""
    data = tmp_path / "mc"
    data.mkdir()
    rows = [{"ctx": f"{i} + 1 =", "endings": [str(i + 1), str(i + 2)], "gold": 0} for i in range(5)]
    write_lines(data / "validation.jsonl", [json.dumps(row) for row in rows])
    task = load_task(TaskConfig(name="sums", hub_name=str(data), context_field="ctx", choices_field="endings",
                                label_field="gold", limit=3))
    assert len(task.items) == 3 and task.items[2].choices == ("3", "4") and task.target_delimiter == " "
    with pytest.raises(ConfigError, match=r"has no column 'context'; its columns: ctx, endings, gold"):
        read_datasets_task(str(data), "sums")
    with pytest.raises(UserError, match=r"downstream task 'x': cannot load dataset .*nowhere"):
        read_datasets_task(str(tmp_path / "nowhere"), "x")


def test_stdlib_next_line_is_deterministic_and_fair():
    task = stdlib_next_line(num_items=40)
    assert task == stdlib_next_line(num_items=40)
    assert len(task.items) == 40 and task.chance == 0.25 and task.target_delimiter == ""
    has_test_suites = len(stdlib_files(include_tests=True)) > len(stdlib_files())
    assert ("test suites" in task.source) == has_test_suites  # held out of the default corpus where present
    for item in task.items:
        indents = {choice[: len(choice) - len(choice.lstrip())] for choice in item.choices}
        assert len(indents) == 1  # indentation gives nothing away
        assert len(set(item.choices)) == 4 and all(choice.endswith("\n") for choice in item.choices)
        assert item.context.endswith("\n") and item.context.count("\n") == 6
    assert len({item.label for item in task.items}) > 1  # the right answer is not always in one place
