"""Execute the notebooks in place, as they are committed: against the default run (``runs/default``, from
``jetmoe train experiments/default.yaml``) and the smoke sweep (run here if it has not been).

    python scripts/execute_notebooks.py [notebooks/routing_exploration.ipynb ...]

Outputs stay in the files (figures as PNG), so a reader on the web sees them; what training logs on stderr
(Lightning's progress and warnings) is dropped. ``tests/test_notebooks.py`` checks that they were committed
executed, top to bottom without errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [REPO / "notebooks/routing_exploration.ipynb", REPO / "notebooks/ablation_analysis.ipynb"]


def main(paths: list[str]) -> None:
    for path in [Path(p).resolve() for p in paths] or NOTEBOOKS:
        if path.name == "routing_exploration.ipynb" and not (REPO / "runs/default/hf").is_dir():
            sys.exit("runs/default is missing: run `jetmoe train experiments/default.yaml` first")
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
        drop_stderr(nb)
        nbformat.write(nb, path)
        print(f"executed {path.relative_to(REPO)} ({path.stat().st_size / 1e3:.0f} kB)")


def drop_stderr(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs if not (out.output_type == "stream" and out.name == "stderr")]


if __name__ == "__main__":
    main(sys.argv[1:])
