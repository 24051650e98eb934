"""The benchmark runs end to end on a tiny config (`--quick`) and writes every row; no speed assertions."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "train_fp32", "train_bf16", "train_fp32_compiled", "train_bf16_compiled", "forward_fp32",
    "decode_b1", "decode_b1_chain_share", "decode_b1_generate_chain_share", "decode_b1_static_compiled",
    "decode_b8", "decode_b8_chain_share", "decode_b8_generate_chain_share", "decode_b8_static_compiled",
    "train_peak_memory", "grad_checkpointing_memory", "scaling_32_experts", "scaling_64_experts",
    "train_fp32_retained",
}


def test_bench_quick_tiny_writes_all_rows(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_vs_transformers.py"), "--config", "tiny", "--quick",
           "--threads", "1", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    result = json.loads((tmp_path / "latest.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert ROWS <= set(rows)
    for name in ("train_fp32", "train_bf16", "forward_fp32", "decode_b1", "decode_b8", "train_peak_memory"):
        assert rows[name]["ours"] > 0 and rows[name]["ratio"] > 0, name
    assert rows["decode_b1"]["target"] == ">= 1.4" and rows["train_bf16"]["target"] == ">= 1.5"
    assert "opt-in" in rows["train_bf16_compiled"]["label"] and rows["train_bf16_compiled"]["target"] is None
    assert rows["train_fp32_compiled"]["skipped"] == rows["train_bf16_compiled"]["skipped"] == "--quick"
    assert rows["decode_b8_static_compiled"]["skipped"] == "--quick"
    assert rows["train_fp32_retained"]["skipped"] == rows["scaling_32_experts"]["skipped"] == "--quick"
    assert rows["scaling_64_experts_forced"]["skipped"] == "--quick"
    assert result["gemm_peak"]["float32"]["flops_per_s"] > 0
    for batch in (1, 8):  # the decode bound in both BLAS forms
        share = rows[f"decode_b{batch}_chain_share"]
        assert [c["form"] for c in share["chains"]] == ["F.linear", "(w @ x^T)^T"]
        assert all(c["tokens_per_s"] > 0 for c in share["chains"])
        split = share["split"]  # ours' time split into the prefill and the steps, each against its chain
        assert split["ours_prefill_s"] > 0 and split["prompt_chain_s"] > 0 and split["chain_step_s"] > 0
        assert split["prompt_weight_bytes"] > 0
        assert rows[f"decode_b{batch}_generate_chain_share"]["ours"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    assert "| metric | ours | transformers | ratio | target | met |" in markdown


def test_out_of_memory_skips_only_what_ran_out(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_vs_transformers", ROOT / "bench" / "bench_vs_transformers.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    results = bench.Results(meta={})

    def fill_the_device() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ran = []
    bench.guard_out_of_memory("train fp32", torch.device("cpu"), results, fill_the_device)
    bench.guard_out_of_memory("train bf16", torch.device("cpu"), results, ran.append, "bf16")
    assert results.meta["out_of_memory"] == ["train fp32"] and ran == ["bf16"]


def test_expert_callback_bench_times_both_sides(tmp_path):
    tiny = ["model=tiny", "data.seq_len=32", "data.batch_size=4", "data.max_chars=100000", "optim.warmup_steps=1",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=2",
            "run.expert_log_every_n_steps=2", f"data.cache_dir={tmp_path}/cache"]
    cmd = [sys.executable, str(ROOT / "bench" / "bench_expert_callback.py"), "--steps", "4", "--rounds", "1",
           "--out-dir", str(tmp_path), str(ROOT / "experiments" / "default.yaml"), *tiny]
    subprocess.run(cmd, cwd=tmp_path, check=True, timeout=600, capture_output=True, text=True)
    result = json.loads((tmp_path / "expert_callback.json").read_text())
    assert len(result["tokens_per_s"]["on"]) == len(result["tokens_per_s"]["off"]) == 1
    assert result["median_on"] > 0 and result["median_off"] > 0
    assert result["slowdown"] == pytest.approx(1 - result["tokens_per_s"]["on"][0] / result["tokens_per_s"]["off"][0])
    assert 0 < result["hook_shares"][0] < 1  # the callback's hooks ran, inside the timed fit
    assert "Slowdown with the callback" in (tmp_path / "expert_callback.md").read_text()
