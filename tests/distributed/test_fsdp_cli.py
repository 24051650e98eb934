"""`jetmoe train ... trainer.strategy=fsdp trainer.devices=2` on CPU (gloo), through the real CLI: sharded
checkpoints, resume, the end-of-run HF export and `jetmoe consolidate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FSDP = [
    "model=tiny", "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=2",
    "run.expert_log_every_n_steps=2", "optim.warmup_steps=2", "data.seq_len=32", "data.batch_size=4",
    "data.max_chars=100000", "run.sample_tokens=8", "trainer.accelerator=cpu", "trainer.devices=2",
    "trainer.strategy=fsdp",
]


def _jetmoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jetmoe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.distributed
def test_fsdp_run_resume_export_and_consolidate(tmp_path):
    transformers = pytest.importorskip("transformers")
    common = ["train", str(REPO / "experiments/default.yaml"), *FSDP, f"run.output_dir={tmp_path}/runs",
              "run.name=fsdp", f"data.cache_dir={tmp_path}/cache"]
    first = _jetmoe(*common, "trainer.max_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs/fsdp"
    last = run_dir / "checkpoints/last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()  # a sharded (distributed) checkpoint
    assert len(list(last.glob("*.distcp"))) == 2  # one shard file per rank

    resumed = _jetmoe(*common, "trainer.max_steps=8", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["tokens_seen"] == 8 * 2 * 4 * 32  # global tokens, both ranks
    assert resumed.stderr.count("step 8/8 | val/loss") == 1  # progress is printed by rank 0 only

    exported = transformers.JetMoeForCausalLM.from_pretrained(run_dir / "hf")
    out = tmp_path / "consolidated"
    done = _jetmoe("consolidate", str(run_dir), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    consolidated = transformers.JetMoeForCausalLM.from_pretrained(out)
    for (name, a), b in zip(exported.state_dict().items(), consolidated.state_dict().values()):
        assert torch.equal(a, b), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # consolidate completes the directory too
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert (out / "generation_config.json").is_file() and "## Evaluation" in (out / "README.md").read_text()
    # downstream evaluation ran on both ranks (items split between them) at steps 0, 4 and, after the resume, 8
    history = json.loads((run_dir / "downstream.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [0, 4, 8]
    generated = _jetmoe("generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.startswith("def")
