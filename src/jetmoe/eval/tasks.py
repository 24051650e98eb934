"""Multiple-choice tasks: a context, a few choices, the index of the right one.

A model answers an item by the log-likelihood of each choice given the context (``jetmoe.eval.scoring``), as
lm-evaluation-harness scores its ``multiple_choice`` tasks; ``target_delimiter`` goes between the two, as there.

Where tasks come from:

* JSON-lines files, one item per line: ``{"context": "...", "choices": ["...", "..."], "label": 1}`` (field
  names configurable; ``label`` an index or the text of the right choice);
* a ``datasets`` table (a hub id for users with a network, or a local dataset directory), same fields;
* :data:`BUILTIN_TASKS`, made from the built-in corpus with nothing to download.

``MultipleChoiceTask.write_jsonl`` writes any task in the JSON-lines form, which ``jetmoe eval --tasks`` hands to
lm-evaluation-harness: both score exactly the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from jetmoe.errors import ConfigError, InputFileError, MissingFileError, UserError

DEFAULT_DELIMITER = " "  # lm-evaluation-harness's default target_delimiter
SPECIAL_TOKEN_TEXT = ("<s>", "</s>", "<pad>")  # the HF tokenizer would read these as special tokens

#: name -> what the task measures; :func:`load_task` builds them.
BUILTIN_TASKS = {
    "stdlib_next_line": (
        "pick the true next line of a Python standard-library test file, given the 6 lines before it, among 4 lines "
        "with the same indentation (3 from other test files; the test suites are not in the default training corpus)"
    ),
}


@dataclass
class TaskConfig:
    """One multiple-choice task: built in (``name`` only), a JSON-lines file (``path``) or a ``datasets`` table."""

    name: str = ""
    path: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "validation"  # hub_name only
    context_field: str = "context"
    choices_field: str = "choices"
    label_field: str = "label"  # an index into the choices, or the text of the right choice
    target_delimiter: Optional[str] = None  # between context and choice; None: " " (lm-eval's), built-ins their own
    limit: Optional[int] = None  # score the first `limit` items; None: all


@dataclass(frozen=True)
class MultipleChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice


@dataclass(frozen=True)
class MultipleChoiceTask:
    name: str
    items: tuple[MultipleChoiceItem, ...]
    target_delimiter: str = DEFAULT_DELIMITER
    source: str = ""  # where the items come from, in words

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing: the mean of 1 / (number of choices)."""
        return sum(1 / len(item.choices) for item in self.items) / len(self.items)

    def write_jsonl(self, path: str | Path) -> Path:
        """The items as JSON lines (``context``, ``choices``, ``label``), the format :func:`read_jsonl_task` reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"context": it.context, "choices": list(it.choices), "label": it.label}) for it in self.items)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path


def load_task(cfg: TaskConfig) -> MultipleChoiceTask:
    """The task a ``downstream.tasks`` entry names; one-line UserErrors for missing or malformed files."""
    fields = (cfg.context_field, cfg.choices_field, cfg.label_field)
    delimiter = DEFAULT_DELIMITER if cfg.target_delimiter is None else cfg.target_delimiter
    if cfg.path is not None:
        return read_jsonl_task(cfg.path, cfg.name, fields=fields, target_delimiter=delimiter, limit=cfg.limit)
    if cfg.hub_name is not None:
        return read_datasets_task(
            cfg.hub_name, cfg.name, config_name=cfg.hub_config, split=cfg.split, fields=fields,
            target_delimiter=delimiter, limit=cfg.limit,
        )
    if cfg.name == "stdlib_next_line":
        return stdlib_next_line(num_items=cfg.limit or STDLIB_NEXT_LINE_ITEMS)
    raise ConfigError(f"downstream task {cfg.name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)})")


# ----------------------------------------------------------------------------- files and datasets tables


def read_jsonl_task(
    path: str | Path,
    name: str,
    *,
    fields: tuple[str, str, str] = ("context", "choices", "label"),
    target_delimiter: str = DEFAULT_DELIMITER,
    limit: int | None = None,
) -> MultipleChoiceTask:
    """A task from a JSON-lines file (blank lines skipped); errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"downstream task {name!r}: {path}: file not found (expected a JSON-lines task file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        items.append(parse_item(record, f"{path}:{lineno}", fields))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise InputFileError(f"{path}: no items (expected one JSON object per line)")
    return MultipleChoiceTask(name, tuple(items), target_delimiter, source=str(path))


def read_datasets_task(
    dataset: str,
    name: str,
    *,
    config_name: str | None = None,
    split: str = "validation",
    fields: tuple[str, str, str] = ("context", "choices", "label"),
    target_delimiter: str = DEFAULT_DELIMITER,
    limit: int | None = None,
) -> MultipleChoiceTask:
    """A task from ``datasets.load_dataset(dataset, config_name, split=split)``: a hub id, or a local directory."""
    import datasets

    try:
        table = datasets.load_dataset(dataset, config_name, split=split)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"downstream task {name!r}: cannot load dataset {dataset!r} split {split!r}: {first_line}") from None
    where = f"dataset {dataset!r} ({split})"
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ConfigError(
            f"downstream task {name!r}: {where} has no column {missing[0]!r}; its columns: {', '.join(table.column_names)}"
        )
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    items = tuple(parse_item(record, f"{where} row {i}", fields) for i, record in enumerate(table))
    if not items:
        raise InputFileError(f"downstream task {name!r}: {where} has no rows")
    return MultipleChoiceTask(name, items, target_delimiter, source=f"{dataset}{f'/{config_name}' if config_name else ''} {split}")


def parse_item(record: Any, where: str, fields: tuple[str, str, str]) -> MultipleChoiceItem:
    """One item from a JSON object / table row; InputFileError naming ``where`` and the field."""
    context_field, choices_field, label_field = fields
    if not isinstance(record, Mapping):
        raise InputFileError(f"{where}: expected a JSON object with {', '.join(fields)}, got {type(record).__name__}")
    for key in fields:
        if key not in record:
            raise InputFileError(f"{where}: no {key!r} field")
    context, choices, label = record[context_field], record[choices_field], record[label_field]
    if not isinstance(context, str):
        raise InputFileError(f"{where}: {context_field!r} must be a string, got {type(context).__name__}")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise InputFileError(f"{where}: {choices_field!r} must be a list of at least 2 non-empty strings")
    return MultipleChoiceItem(context, tuple(choices), _label_index(label, choices, where, label_field))


def _label_index(label: Any, choices: list[str], where: str, label_field: str) -> int:
    """An int index, a string of digits, or the text of one of the choices -> the index."""
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    elif isinstance(label, str) and label in choices:
        return choices.index(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise InputFileError(f"{where}: {label_field!r} must be a choice index or the text of a choice, got {label!r}")
    if not 0 <= label < len(choices):
        raise InputFileError(f"{where}: {label_field!r} {label} is outside the {len(choices)} choices (0..{len(choices) - 1})")
    return label


# ----------------------------------------------------------------------------- built-in: stdlib_next_line

STDLIB_NEXT_LINE_ITEMS = 128
CONTEXT_LINES = 6
NUM_CHOICES = 4
DISTRACTOR_FILES = 20  # distractors come from the next files in the seeded order
TARGET_CHARS = (8, 72)  # a candidate line's length without indentation: long enough to say something


def stdlib_next_line(num_items: int = STDLIB_NEXT_LINE_ITEMS, seed: int = 0) -> MultipleChoiceTask:
    """Given 6 lines of a standard-library test file, pick the line that follows among 4: it and 3 lines with the
    same indentation from other test files (so indentation gives nothing away; the context's names and flow do).
    One item per file, files in a seeded order.

    The distractors are lines of other files rather than of the same one because a file's own lines are often
    near-copies of the true one (runs of similar asserts): too close to call for a small model, whose curve stays at
    chance. The test suites are held out of the default training corpus (``data.stdlib_include_tests: false``); on
    an interpreter installed without them the items come from the rest of the standard library, which the default
    corpus contains. Deterministic for one interpreter: sorted files, ``random.Random(seed)``, no hashing.
    """
    from jetmoe.data.sources import stdlib_files, stdlib_root

    every = stdlib_files(include_tests=True)
    trained_on = set(stdlib_files(include_tests=False))
    held_out = [path for path in every if path not in trained_on]
    files, source = (held_out, "the standard library's test suites") if held_out else (every, "the standard library")
    root = stdlib_root()
    rng = random.Random(seed)
    order = sorted(files, key=lambda path: path.relative_to(root).as_posix())
    rng.shuffle(order)
    files_ = _Files(order)
    items = []
    for f in range(len(order)):
        item = _next_line_item(files_[f][0], [files_[g][1] for g in range(f + 1, f + 1 + DISTRACTOR_FILES)], rng)
        if item is not None:
            items.append(item)
            if len(items) == num_items:
                break
    if not items:
        raise InputFileError(f"stdlib_next_line: no usable lines in the standard library under {root}")
    return MultipleChoiceTask("stdlib_next_line", tuple(items), target_delimiter="", source=f"{source} ({root})")


class _Files:
    """The lines of ``paths[i]`` and its candidate lines by indentation (nothing past the end or for a file that is
    not UTF-8), each file read once."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.cache: dict[int, tuple[list[str], dict[str, list[str]]]] = {}

    def __getitem__(self, i: int) -> tuple[list[str], dict[str, list[str]]]:
        if i not in self.cache:
            try:
                lines = self.paths[i].read_text(encoding="utf-8").splitlines(keepends=True) if i < len(self.paths) else []
            except (UnicodeDecodeError, OSError):
                lines = []
            by_indent: dict[str, list[str]] = {}
            for line in lines:
                if _candidate(line):
                    by_indent.setdefault(_indent(line), []).append(line)
            self.cache[i] = lines, by_indent
        return self.cache[i]


def _next_line_item(lines: list[str], others: list[dict[str, list[str]]], rng: random.Random) -> MultipleChoiceItem | None:
    targets = [
        i for i in range(CONTEXT_LINES, len(lines))
        if _candidate(lines[i]) and sum(bool(line.strip()) for line in lines[i - CONTEXT_LINES : i]) >= CONTEXT_LINES // 2
    ]
    if not targets:
        return None
    i = rng.choice(targets)
    context, target, indent = "".join(lines[i - CONTEXT_LINES : i]), lines[i], _indent(lines[i])
    if any(token in context for token in SPECIAL_TOKEN_TEXT):
        return None
    pool = sorted({line for other in others for line in other.get(indent, ()) if line != target})
    if len(pool) < NUM_CHOICES - 1:
        return None
    choices = [target, *rng.sample(pool, NUM_CHOICES - 1)]
    rng.shuffle(choices)
    return MultipleChoiceItem(context, tuple(choices), choices.index(target))


def _candidate(line: str) -> bool:
    body = line.strip()
    return (
        line.endswith("\n") and TARGET_CHARS[0] <= len(body) <= TARGET_CHARS[1] and line.isascii()
        and not body.startswith("#") and not any(token in line for token in SPECIAL_TOKEN_TEXT)
    )


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def task_summary(tasks: Iterable[MultipleChoiceTask]) -> str:
    """``name (N items, chance 25.0%)`` for each task, for log lines."""
    return ", ".join(f"{t.name} ({len(t.items)} items, chance {t.chance:.1%})" for t in tasks)
