"""The `jetmoe` command end to end on a shrunken default experiment, and its one-line user errors.

One tiny training run (``python -m jetmoe.cli train experiments/default.yaml`` with overrides, as
a subprocess) is shared by the session; the error table runs ``main()`` in-process.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetmoe.cli import main

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "experiments/default.yaml")
TINY = [
    "model=tiny", "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=2", "run.expert_log_every_n_steps=2", "optim.warmup_steps=2",
    "data.seq_len=32", "data.batch_size=4", "data.max_chars=100000", "run.sample_tokens=16",
]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def jetmoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jetmoe.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli")
    result = jetmoe(
        "train", DEFAULT, *TINY, f"run.output_dir={root}/runs", "run.name=tiny", f"data.cache_dir={root}/cache",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs/tiny", result


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT)
    return path


def test_train_writes_a_complete_run_dir(tiny_run):
    run_dir, result = tiny_run
    for name in ("config.yaml", "checkpoints/last.ckpt", "metrics.json", "expert_utilization.json",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["tokens_seen"] == 8 * 4 * 32
    assert math.isfinite(metrics["val_loss"]) and metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert metrics["params_active"] < metrics["params_total"]
    assert "# resolved config" in result.stdout and "hidden_size: 64" in result.stdout
    assert "== sample ==" in result.stdout and f"tensorboard --logdir {run_dir}/tb" in result.stdout
    assert "step 8/8 | val/loss" in result.stderr  # the plain-text progress log


def test_tensorboard_has_the_training_curves(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/aux", "train/z", "train/lr", "train/tokens_per_sec", "val/loss", "val/ppl"} <= scalars
    assert [e.step for e in events.Scalars("val/loss")] == [3, 7]  # steps 4 and 8 (0-based logger steps)


def test_hf_export_loads_in_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    from jetmoe import load_pretrained

    hf_dir = tiny_run[0] / "hf"
    hf, info = transformers.JetMoeForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = load_pretrained(hf_dir).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_generate_prints_the_prompt_and_a_continuation(tiny_run):
    run_dir, _ = tiny_run
    result = jetmoe("generate", str(run_dir), "--prompt", "def f", "--max-new-tokens", "12", "--seed", "3", cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f") and len(result.stdout) > len("def f\n")


def test_generate_and_evaluate_in_process(tiny_run, text_file):
    from jetmoe.training.run import evaluate, generate

    run_dir, _ = tiny_run
    greedy = [generate(run_dir / "hf", "import ", 10, do_sample=False) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("import ")
    result = evaluate(run_dir, [str(text_file)], seq_len=32, batch_size=3)
    assert result["tokens"] > 0 and result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["loss"] < math.log(512) + 1  # a trained tiny model is no worse than uniform by much


def test_eval_cli(tiny_run, text_file):
    run_dir, _ = tiny_run
    result = jetmoe("eval", str(run_dir), str(text_file), "--batch-size", "2", cwd=text_file.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loss ") and " ppl " in result.stdout


def test_report_cli(tiny_run, capsys):
    assert main(["report", str(tiny_run[0])]) == 0
    out = capsys.readouterr().out
    assert "expert utilization" in out and "val_loss=" in out


def test_resume_continues_to_a_larger_max_steps(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "runs/tiny")
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    result = jetmoe(
        "train", DEFAULT, *overrides, "trainer.max_steps=12", f"run.output_dir={tmp_path}/runs", "run.name=tiny",
        f"data.cache_dir={run_dir.parents[1]}/cache", "--resume", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states" in result.stderr
    metrics = json.loads((tmp_path / "runs/tiny/metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["tokens_seen"] == 12 * 4 * 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overrides", [
    ["trainer.precision=bf16-mixed"],
    ["trainer.precision=bf16-true"],
    ["trainer.precision=bf16-mixed", "trainer.strategy=fsdp", "trainer.compile=true"],
], ids=["bf16-mixed", "bf16-true", "fsdp-compiled"])
def test_train_on_one_gpu(tmp_path, overrides):
    """The `gpu` trainer group on one device: bf16 autocast, pure bf16, and FSDP2 (one NCCL rank) with compiled
    blocks."""
    result = jetmoe(
        "train", DEFAULT, *TINY, "trainer=gpu", "trainer.devices=1", *overrides, f"run.output_dir={tmp_path}/runs",
        "run.name=gpu", f"data.cache_dir={tmp_path}/cache", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/gpu/metrics.json").read_text())
    assert metrics["step"] == 8 and math.isfinite(metrics["val_loss"])


# ----------------------------------------------------------------------------- user errors


@pytest.fixture
def tokenizer_400(tmp_path) -> Path:
    from jetmoe.data.tokenizer import SpecialTokens, train_tokenizer

    path = tmp_path / "tok400.json"
    train_tokenizer([TEXT, "def f(x):\n    return x\n" * 50], 400, SpecialTokens()).save(str(path))
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 50)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "typo.yaml").write_text(f"defaults:\n  - model: tiny\nmodel:\n  hiden_size: 64\n")
    (tmp_path / "list.yaml").write_text("- model: tiny\n")
    return {p.name: p for p in tmp_path.iterdir()}


FILE_DATA = ["data=text_files"]
ERRORS = [
    # (experiment or None for the default, overrides, expected message fragment)
    ("typo.yaml", [], "typo.yaml: unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    ("list.yaml", [], "list.yaml: expected a mapping of config keys, got a list"),
    ("missing.yaml", [], "config file not found"),
    (None, ["model.hidden_size=wide"], "command line: 'model.hidden_size' expects int, got 'wide'"),
    (None, ["model.num_experts_per_tok=5"], "model.num_experts_per_tok (5) must be <= num_local_experts (4)"),
    (None, ["data.seq_len=300"], "data.seq_len (300) must be <= model.max_position_embeddings (256)"),
    (None, [*FILE_DATA, "data.data_files=[{tmp}/nope.txt]"], "nope.txt"),
    (None, [*FILE_DATA, "data.data_files=[{tmp}/empty.txt]"], "empty.txt: file is empty"),
    (None, [*FILE_DATA, "data.data_files=[{tmp}/latin1.txt]"], "latin1.txt: not UTF-8"),
    (None, ["model.vocab_size=300", "data.tokenizer_path={tmp}/tok400.json"], "> model.vocab_size 300"),
    (None, ["run.output_dir={tmp}/a_file/runs"], "cannot write the run directory"),
    (None, ["trainer.strategy=fsdp", "trainer.expert_parallel=2", "trainer.devices=3"],
     "trainer.expert_parallel (2) must divide the number of ranks, trainer.devices × trainer.num_nodes (3)"),
    (None, ["trainer.strategy=fsdp", "trainer.expert_parallel=2", "trainer.devices=1"],  # no distributed launch
     "trainer.expert_parallel (2) must divide the number of ranks, trainer.devices × trainer.num_nodes (1)"),
]


@pytest.mark.parametrize(("experiment", "overrides", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tokenizer_400, capsys, experiment, overrides, message):
    files = _files(tmp_path)
    path = str(files.get(experiment, tmp_path / str(experiment))) if experiment else DEFAULT
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    defaults = [*TINY, f"run.output_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"]
    assert main(["train", path, *defaults, *overrides]) == 2  # later overrides win
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("jetmoe: error: ")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{tmp}"], "is neither a run directory"),
        (["eval", "{run}", "{tmp}/nope.txt"], "file not found: "),
        (["eval", "{run}", "{tmp}/empty.txt"], "empty.txt: file is empty"),
        (["report", "{tmp}"], "no expert_utilization.json"),
        (["train", DEFAULT, "run.output_dir={runs}", "run.name=tiny"], "already holds a run: pass --resume"),
        (["train", DEFAULT, *TINY, "run.output_dir={tmp}", "--resume"], "--resume: no checkpoint in"),
    ],
)
def test_other_commands_fail_cleanly(tiny_run, tmp_path, capsys, argv, message):
    _files(tmp_path)
    run_dir = tiny_run[0]
    argv = [a.format(tmp=tmp_path, run=run_dir, runs=run_dir.parent) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("jetmoe: error: ") == 1 and message in err and "Traceback" not in err


def test_plan_compares_fsdp_alone_with_each_expert_parallel_degree(capsys):
    plan = ["plan", str(REPO / "experiments/jetmoe_8b.yaml"), "model.num_local_experts=64", "trainer.expert_parallel=8"]
    assert main([*plan, "--gpus", "128"]) == 0
    out = capsys.readouterr().out
    assert "MoE experts split over 8 devices (inside a node), FSDP over 16" in out
    table = out[out.index("expert_parallel  all-gather GB"):].splitlines()
    assert [row.split()[0] for row in table[1:-1]] == ["1", "2", "4", "8", "16", "32", "64"]
    assert table[4].startswith("8 (configured)")
    assert table[-1].endswith("moves the fewest bytes; inside a node, expert_parallel=8")
    assert main([*plan, "--gpus", "12"]) == 2
    assert capsys.readouterr().err.strip() == "jetmoe: error: expert_parallel (8) must divide gpus (12)"
