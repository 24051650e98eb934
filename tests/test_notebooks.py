"""The notebooks run headlessly (nbclient) on tiny settings without errors, and are committed executed (against
the default run and the smoke sweep), their figures in the file as small PNGs.

Parameters are injected papermill-style: a cell after the one tagged ``parameters`` reassigns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("routing_exploration.ipynb", "ablation_analysis.ipynb")
TINY_TRAINING = [
    "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=3",
    "run.expert_log_every_n_steps=3", "optim.warmup_steps=1", "data.seq_len=32", "data.batch_size=4",
    "data.max_chars=60000",
]


def execute(name: str, parameters: dict[str, Any], tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def text_outputs(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
    )


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs)


COMMITTED_IMAGES = {"routing_exploration.ipynb": 7, "ablation_analysis.ipynb": 3}
MAX_NOTEBOOK_BYTES = 1_500_000


@pytest.mark.parametrize("name", NAMES)
def test_committed_executed_with_figures_and_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # top to bottom, one pass
    assert not any(output.output_type == "error" for cell in code for output in cell.outputs)
    assert images(nb) >= COMMITTED_IMAGES[name]  # a reader on the web sees the figures
    assert (NOTEBOOKS / name).stat().st_size < MAX_NOTEBOOK_BYTES
    assert not any("injected-parameters" in cell.metadata.get("tags", []) for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "class " not in "".join(cell.source for cell in code)  # the model comes from jetmoe, never redefined


def test_routing_exploration_trains_a_tiny_run_and_analyses_it(tmp_path):
    nb = execute("routing_exploration.ipynb", {
        "RUN_DIR": None, "TRAIN_STEPS": 6, "MAX_CHARS": 60_000, "WORK_DIR": str(tmp_path / "runs"), "TEXT_CHARS": 3000, "MAX_TOKENS": 512,
        "TRAIN_OVERRIDES": ["data.seq_len=32", "data.batch_size=4", f"data.cache_dir={tmp_path}/cache"],
    }, tmp_path)
    out = text_outputs(nb)
    assert "2 layers, 4 experts, top-2" in out
    assert images(nb) >= 7  # load heatmaps, type preference x 2, entropy across stages, downstream, routing over time x 2


def test_ablation_analysis_runs_the_smoke_sweep_and_interprets_it(tmp_path):
    nb = execute("ablation_analysis.ipynb", {
        "SWEEP_DIR": None, "SWEEP_OVERRIDES": [*TINY_TRAINING, f"data.cache_dir={tmp_path}/cache",
                                               f"sweep_dir={tmp_path}/sweep", "only=dense,bias", "seeds=1,2"],
    }, tmp_path)
    out = text_outputs(nb)
    assert "4 finished point(s)" in out
    assert "Dense baseline dense_s1" in out and "bias_s2 (8 experts, top-2) reaches val loss" in out
    assert "bias: Δ = " in out and "nats vs dense over 2 seed(s)" in out
    assert images(nb) == 3
    assert (tmp_path / "sweep/summary.csv").is_file()
