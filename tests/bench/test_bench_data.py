"""bench/bench_data.py runs end to end on tiny inputs (`--quick`) and writes every figure; no speed assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_data.py"), "--quick", "--out-dir", str(tmp_path), *args]
    subprocess.run(cmd, cwd=tmp_path, check=True, timeout=900, capture_output=True, text=True)
    return json.loads((tmp_path / "data.json").read_text())


def test_throughput_and_mixture_rows(tmp_path):
    result = run_bench(tmp_path, "--only", "throughput", "mixture")
    t, m = result["throughput"], result["mixture"]
    assert t["prepare_tokens_per_s"] > 0 and len(t["ceiling_fast_tokens_per_s"]) == 2 and t["ratio"] > 0
    assert m["windows_per_phase"] == 10_000 and set(m["phase1_shares"]) == {"web", "code", "math"}
    assert m["phase1_max_error_windows"] <= 1 and m["phase2_max_error_windows"] <= 1
    markdown = (tmp_path / "data.md").read_text()
    assert "| prepare throughput" in markdown and "| mixture shares" in markdown


@pytest.mark.slow
def test_every_row(tmp_path):
    result = run_bench(tmp_path)
    assert [r["chars"] > 0 for r in result["rss"]] == [True, True]
    assert all(r["peak_rss_bytes"] > 0 for r in result["rss"])
    assert 0 < result["loading"]["share"] < 1 and result["loading"]["steps"] == 4
    assert (tmp_path / "data.md").read_text().count("\n| ") == 5  # header + 4 figures
