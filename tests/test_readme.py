"""The README stays true: its Python example runs, and its quick-start test command is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section_code(heading: str, lang: str) -> str:
    section = README[README.index(heading):]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_python_usage_example_runs(tmp_path, monkeypatch):
    code = _section_code("## Python usage", "python").replace("/tmp/jetmoe-tiny", str(tmp_path / "tiny"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert namespace["out"].aux_loss is not None


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    commands = [line for line in _section_code("## Quick start", "bash").splitlines() if line.strip()]
    assert len(commands) == 2
    assert "jetmoe train experiments/default.yaml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
