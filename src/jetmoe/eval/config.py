"""The ``downstream:`` experiment section: which multiple-choice tasks the training run scores, and how often.

    downstream:
      every_n_steps: 200          # 0 turns downstream evaluation off
      tasks:
        - name: stdlib_next_line  # built in: no file, no download
        - name: my_task
          path: data/my_task.jsonl            # {"context": ..., "choices": [...], "label": 0} per line
        - name: hellaswag
          hub_name: Rowan/hellaswag           # a `datasets` dataset (hub id or local directory)
          split: validation
          context_field: ctx
          choices_field: endings
          limit: 500

Each task is one of: a built-in task (``name`` only, see :data:`jetmoe.eval.tasks.BUILTIN_TASKS`), a JSON-lines
file (``path``) or a ``datasets`` table (``hub_name``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from jetmoe.errors import ConfigError
from jetmoe.eval.tasks import BUILTIN_TASKS, TaskConfig

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a TensorBoard tag and a file name


@dataclass
class DownstreamConfig:
    """Downstream evaluation during training (:class:`jetmoe.eval.callback.DownstreamEvalCallback`)."""

    every_n_steps: int = 200  # optimizer steps between evaluations (and the last step); 0 disables
    at_start: bool = True  # also score the initial weights (step 0: the curve starts at chance)
    batch_size: int = 32  # sequences (context + one choice) per forward pass
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig(name="stdlib_next_line")])


def validate_downstream_config(cfg: DownstreamConfig) -> None:
    """Raise ConfigError with one line naming the first invalid ``downstream.*`` key (files are read later)."""
    if not isinstance(cfg.every_n_steps, int) or cfg.every_n_steps < 0:
        raise ConfigError(f"downstream.every_n_steps must be >= 0 (0 disables), got {cfg.every_n_steps!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"downstream.batch_size must be >= 1, got {cfg.batch_size}")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        key = f"downstream.tasks[{i}]"
        if not TASK_NAME.match(task.name or ""):
            raise ConfigError(f"{key}.name must be a name of letters, digits, '_', '.' or '-', got {task.name!r}")
        if task.name in seen:
            raise ConfigError(f"{key}.name: two tasks are called {task.name!r}")
        seen.add(task.name)
        if task.path is not None and task.hub_name is not None:
            raise ConfigError(f"{key}: set path (a JSON-lines file) or hub_name (a datasets table), not both")
        if task.path is None and task.hub_name is None and task.name not in BUILTIN_TASKS:
            raise ConfigError(
                f"{key}.name: {task.name!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}); "
                "set path (a JSON-lines file) or hub_name (a datasets table) for your own"
            )
        if task.limit is not None and task.limit < 1:
            raise ConfigError(f"{key}.limit must be >= 1 (null: every item), got {task.limit}")
