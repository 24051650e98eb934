"""A `jetmoe train` killed with SIGKILL between checkpoints resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jetmoe.training.reliability import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "train", str(REPO / "experiments/default.yaml"), "model=tiny", "trainer.max_steps=40",
    "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5",
    "run.expert_log_every_n_steps=5", "optim.warmup_steps=5", "data.seq_len=32", "data.batch_size=4",
    "data.max_chars=100000", "run.sample_tokens=0",
]


PROSE = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "


def _cmd(root: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jetmoe.cli", *RUN, f"run.output_dir={root}/runs", f"run.name={name}",
            f"data.cache_dir={root}/cache", *extra]


def _two_sources(root: Path) -> list[str]:
    """The stdlib (weight 3) and a JSON-lines source of prose (weight 1), prose 3:1 from step 25 on."""
    rows = [json.dumps({"text": PROSE * (1 + i % 7) + f"Line {i}."}) for i in range(400)]
    (root / "prose.jsonl").write_text("\n".join(rows) + "\n")
    return ["data.sources.stdlib.weight=3", "data.sources.prose.kind=files",
            f"data.sources.prose.data_files=[{root}/prose.jsonl]", "data.sources.prose.weight=1",
            "data.phases=[{name: late, start: 25, weights: {stdlib: 1, prose: 3}}]"]


def _step(ckpt: Path) -> int:
    try:
        return read_checkpoint(ckpt)["global_step"]
    except (FileNotFoundError, ValueError):
        return -1


@pytest.mark.parametrize("mixture", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["stdlib", "two_sources"])
def test_kill_then_resume_equals_uninterrupted(tmp_path, mixture):
    data = _two_sources(tmp_path) if mixture else []
    done = subprocess.run(_cmd(tmp_path, "whole", *data), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    run_dir = tmp_path / "runs/killed"
    proc = subprocess.Popen(_cmd(tmp_path, "killed", *data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _step(run_dir / "checkpoints/last.ckpt") < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()  # it really died mid-run
    assert 10 <= _step(run_dir / "checkpoints/last.ckpt") < 40

    resumed = subprocess.run(_cmd(tmp_path, "killed", *data, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = load_file(tmp_path / "runs/whole/hf/model.safetensors")
    again = load_file(run_dir / "hf/model.safetensors")
    assert whole.keys() == again.keys()
    for key in whole:
        assert torch.equal(whole[key], again[key]), key  # bit-identical on CPU fp32
    a, b = (json.loads((tmp_path / f"runs/{n}/metrics.json").read_text()) for n in ("whole", "killed"))
    assert (a["step"], a["tokens_seen"], a["val_loss"]) == (b["step"], b["tokens_seen"], b["val_loss"])
    assert a["data_mix"] == b["data_mix"]
    if mixture:  # 25 steps x 4 windows at 3:1, then 15 x 4 at 1:3; logged to TensorBoard every 5 steps
        phases = {p["name"]: p for p in b["data_mix"]["phases"]}
        assert phases["base"]["shares"] == {"stdlib": 0.75, "prose": 0.25} and phases["base"]["windows"] == 100
        assert phases["late"]["shares"] == {"stdlib": 0.25, "prose": 0.75} and phases["late"]["start_step"] == 25
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        prose = {e.step: e.value for e in events.Scalars("data/mix/prose")}
        assert prose[19] == pytest.approx(0.25) and prose[39] == pytest.approx(0.75)


def test_diverging_run_stops_with_the_step_and_term_named(tmp_path):
    result = subprocess.run(
        _cmd(tmp_path, "nan", "optim.lr=1e30", "optim.warmup_steps=1", "optim.grad_clip=0", "trainer.max_steps=20"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("jetmoe: error: step ") and "non-finite" in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs/nan/hf").exists()
