"""`jetmoe train ... trainer.strategy=fsdp trainer.devices=2` on CPU (gloo), through the real CLI: sharded
checkpoints, resume, the end-of-run HF export and `jetmoe consolidate`; and 4 ranks with expert parallelism
(EP = 2 x data-parallel 2) killed with SIGKILL mid-run, resumed with EP = 2 and with EP = 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def _sharded_step(ckpt: Path) -> int:
    """The step of a complete sharded checkpoint directory (-1 while there is none)."""
    try:
        return torch.load(ckpt / "meta.pt", weights_only=True)["global_step"] if (ckpt / ".metadata").is_file() else -1
    except (FileNotFoundError, EOFError, RuntimeError):  # being renamed into place
        return -1


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_run_killed_and_resumed_with_ep_2_and_ep_1(tmp_path):
    """4 ranks, trainer.expert_parallel=2: SIGKILL to every rank after the step-2 checkpoint; --resume with EP = 2
    gives the uninterrupted run's weights bit for bit, --resume of the same checkpoint with EP = 1 gives them up to
    fp32 reduction order; the consolidated checkpoint loads in transformers."""
    transformers = pytest.importorskip("transformers")
    ep = [*FSDP, "trainer.devices=4", "trainer.expert_parallel=2", "trainer.expert_parallel_attention=true",
          "trainer.max_steps=8", "trainer.val_check_interval=2", "run.sample_tokens=0"]

    def command(name: str, *extra: str) -> list[str]:
        return ["train", str(REPO / "experiments/default.yaml"), *ep, f"run.output_dir={tmp_path}/runs",
                f"run.name={name}", f"data.cache_dir={tmp_path}/cache", *extra]

    whole = _jetmoe(*command("whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "runs/killed"
    proc = subprocess.Popen([sys.executable, "-m", "jetmoe.cli", *command("killed")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while _sharded_step(killed / "checkpoints/last.ckpt") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the 3 ranks it launched
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()  # it died mid-run
    assert 2 <= _sharded_step(killed / "checkpoints/last.ckpt") < 8
    shutil.copytree(killed, tmp_path / "runs/ep1")

    resumed = _jetmoe(*command("killed", "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    without_ep = _jetmoe(*command("ep1", "trainer.expert_parallel=1", "--resume"), cwd=tmp_path)
    assert without_ep.returncode == 0, without_ep.stderr[-3000:]

    expected = load_file(tmp_path / "runs/whole/hf/model.safetensors")
    for name in ("killed", "ep1"):
        got = load_file(tmp_path / f"runs/{name}/hf/model.safetensors")
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            if name == "killed":
                assert torch.equal(got[key], tensor), key
            else:
                torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=0, msg=key)
    metrics = [json.loads((tmp_path / f"runs/{n}/metrics.json").read_text()) for n in ("whole", "killed", "ep1")]
    assert {(m["step"], m["tokens_seen"]) for m in metrics} == {(8, 8 * 4 * 4 * 32)}

    out = tmp_path / "consolidated"
    done = _jetmoe("consolidate", str(killed), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    consolidated = transformers.JetMoeForCausalLM.from_pretrained(out)
    for key, tensor in consolidated.state_dict().items():
        assert torch.equal(tensor, expected[key]) if key in expected else key == "lm_head.weight", key
