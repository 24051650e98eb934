"""lm-evaluation-harness on an HF model directory (``jetmoe eval RUN_DIR --tasks ...``).

Each ``--tasks`` entry is one of

* a built-in task name (:data:`jetmoe.eval.tasks.BUILTIN_TASKS`),
* a JSON-lines task file (``*.jsonl`` / ``*.json``, the format of :func:`jetmoe.eval.tasks.read_jsonl_task`),
* an lm-eval task YAML file (``*.yaml`` / ``*.yml``),
* a task, group or tag name lm-eval knows (``lm-eval ls tasks``; most download their data from the hub).

Built-in and JSON-lines tasks become inline lm-eval ``multiple_choice`` configs over a JSON-lines copy of their
items, scored with the same requests and ``acc`` / ``acc_norm`` as the training callback. The model runs as lm-eval's
``hf`` model (``AutoModelForCausalLM`` + ``AutoTokenizer`` on the directory, as ``lm_eval --model hf`` does) with
``prefix_token_id`` = EOS: an empty context is conditioned on the document boundary the model was trained after
(lm-eval's own default would be the BOS token, which training data never contains).
lm-evaluation-harness is optional: ``pip install 'jetmoe[eval]'``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Sequence

from jetmoe.errors import MissingFileError, UserError
from jetmoe.eval.tasks import BUILTIN_TASKS, MultipleChoiceTask, TaskConfig, load_task, read_jsonl_task

TASK_FILE_SUFFIXES, YAML_SUFFIXES = (".jsonl", ".json"), (".yaml", ".yml")


def lm_eval_task_config(task: MultipleChoiceTask, data_file: str | Path) -> dict[str, Any]:
    """An inline lm-eval task config scoring ``data_file`` (``task.write_jsonl``'s output) zero-shot as lm-eval's
    ``multiple_choice``: request ``(context, target_delimiter + choice)``, metrics ``acc`` and ``acc_norm``."""
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # column names: lm-eval reads the field as it is (no template)
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": task.target_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def resolve_tasks(specs: Sequence[str], work_dir: str | Path) -> tuple[list[Any], Any]:
    """(what ``lm_eval.simple_evaluate`` takes as ``tasks``, the ``TaskManager`` that knows them). Task files are
    read and checked here; a name lm-eval does not know raises UserError (with the closest names)."""
    work_dir = Path(work_dir)
    tasks: list[Any] = []
    names: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if spec in BUILTIN_TASKS:
            tasks.append(_inline(load_task(TaskConfig(name=spec)), work_dir))
        elif path.suffix in TASK_FILE_SUFFIXES:
            tasks.append(_inline(read_jsonl_task(path, path.stem.replace(" ", "_")), work_dir))
        elif path.suffix in YAML_SUFFIXES:
            if not path.is_file():
                raise MissingFileError(f"--tasks: {spec}: file not found (expected an lm-eval task YAML)")
            tasks.append(str(path.resolve()))
        else:
            names.append(spec)
            tasks.append(spec)
    lm_eval = _import_lm_eval()
    manager = lm_eval.tasks.TaskManager(include_defaults=bool(names))
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(f"--tasks: unknown task {name!r}{hint}; `lm-eval ls tasks` lists lm-eval's tasks, and "
                            f"built-in ones are {', '.join(BUILTIN_TASKS)}")
    return tasks, manager


def run_lm_eval(
    hf_dir: str | Path,
    specs: Sequence[str],
    *,
    work_dir: str | Path,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's ``hf`` model on ``hf_dir`` over ``specs``; lm-eval's result dict (``results``, ``versions``,
    ``n-shot``, ``config``, ... and ``samples`` with ``log_samples``) plus ``lm_eval_version``."""
    import torch

    tasks, manager = resolve_tasks(specs, work_dir)
    lm_eval = _import_lm_eval()
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    eos = config["eos_token_id"][0] if isinstance(config["eos_token_id"], list) else config["eos_token_id"]
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir), "prefix_token_id": eos},
            tasks=tasks,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            log_samples=log_samples,
        )
    except ConnectionError as err:  # a hub task's data, offline (datasets raises ConnectionError for both)
        raise UserError(f"--tasks: {err} (this task downloads its data: it needs a network, or the data already in "
                        "the datasets cache)") from None
    results["lm_eval_version"] = lm_eval.__version__
    return results


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results).rstrip()


def _inline(task: MultipleChoiceTask, work_dir: Path) -> dict[str, Any]:
    return lm_eval_task_config(task, task.write_jsonl(work_dir / f"{task.name}.jsonl"))


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install 'jetmoe[eval]'") from None
    return lm_eval
