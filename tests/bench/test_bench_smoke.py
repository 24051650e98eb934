"""The benchmark runs end to end on a tiny config (`--quick`) and writes every row; no speed assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "train_fp32", "train_bf16", "train_fp32_compiled", "forward_fp32",
    "decode_b1_dynamic", "decode_b1_static_compiled", "decode_b1", "decode_b1_chain_share",
    "decode_b8_dynamic", "decode_b8_static_compiled", "decode_b8", "decode_b8_chain_share",
    "train_peak_memory", "grad_checkpointing_memory", "scaling_32_experts", "scaling_64_experts",
}


def test_bench_quick_tiny_writes_all_rows(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_vs_transformers.py"), "--config", "tiny", "--quick",
           "--threads", "1", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=120, capture_output=True, text=True)
    result = json.loads((tmp_path / "latest.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert ROWS <= set(rows)
    for name in ("train_fp32", "train_bf16", "forward_fp32", "decode_b1", "decode_b8", "train_peak_memory"):
        assert rows[name]["ours"] > 0 and rows[name]["ratio"] > 0, name
    assert rows["decode_b1"]["target"] == ">= 1.4"
    assert rows["train_fp32_compiled"]["skipped"] == "--quick"
    assert result["gemm_peak"]["float32"]["flops_per_s"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    assert "| metric | ours | transformers | ratio | target | met |" in markdown
