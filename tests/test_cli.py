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
    for name in ("config.yaml", "checkpoints/last.ckpt", "metrics.json", "expert_utilization.json", "downstream.json",
                 "figures/loss.png", "figures/downstream.png", "figures/expert_load.png",
                 "figures/imbalance_over_time.png", "figures/expert_share_over_time.png",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/tokenizer_config.json",
                 "hf/special_tokens_map.json", "hf/generation_config.json", "hf/README.md", "hf/figures/loss.png"):
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
    assert {"train/loss", "train/ce", "train/aux", "train/z", "train/lr", "train/tokens_per_sec", "val/loss", "val/ppl",
            "data/mix/stdlib"} <= scalars
    assert [e.step for e in events.Scalars("val/loss")] == [3, 7]  # steps 4 and 8 (0-based logger steps)
    # the built-in downstream task on the initial weights and at the last step (optimizer steps done)
    assert [e.step for e in events.Scalars("downstream/stdlib_next_line/acc_norm")] == [0, 8]


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


def test_hf_export_works_in_the_hf_ecosystem_as_written(tiny_run):
    """AutoTokenizer (special tokens set), AutoModelForCausalLM, pipeline, and a model card with the run's results."""
    transformers = pytest.importorskip("transformers")
    import yaml

    hf_dir = tiny_run[0] / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("def ", max_new_tokens=8, do_sample=False, return_full_text=False)
    assert len(tokenizer(out[0]["generated_text"]).input_ids) <= 8
    meta = yaml.safe_load((hf_dir / "README.md").read_text().split("---\n")[1])
    datasets = {result["dataset"]["type"] for result in meta["model-index"][0]["results"]}
    assert datasets == {"python-stdlib", "stdlib_next_line"}


def test_eval_tasks_match_the_downstream_callback(tiny_run, capsys):
    """`jetmoe eval RUN --tasks stdlib_next_line` runs lm-evaluation-harness on the export; on the same items it
    gives the accuracy the training callback logged at the last step. Results land in RUN/eval and the model card."""
    pytest.importorskip("lm_eval")
    run_dir, _ = tiny_run
    assert main(["eval", str(run_dir), "--tasks", "stdlib_next_line", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "stdlib_next_line" in out and "acc_norm" in out
    [written] = (run_dir / "eval").glob("lm_eval-*.json")
    theirs = json.loads(written.read_text())["results"]["stdlib_next_line"]
    ours = json.loads((run_dir / "downstream.json").read_text())["history"][-1]
    assert ours["step"] == 8
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["tasks"]["stdlib_next_line"]["acc"],
                                                             ours["tasks"]["stdlib_next_line"]["acc_norm"])
    assert "lm-evaluation-harness 0.4" in (run_dir / "hf" / "README.md").read_text()


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
    assert f"{tiny_run[0]}/figures/expert_load.png  (Expert load)" in out


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


def test_resume_with_another_architecture_names_the_key(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "runs/tiny")
    code = main(["train", DEFAULT, *TINY, "model.num_hidden_layers=3", f"run.output_dir={tmp_path}/runs",
                 "run.name=tiny", f"data.cache_dir={run_dir.parents[1]}/cache", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--resume: model.num_hidden_layers is 3, but the run in" in err


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
    good = '{"context": "a", "choices": ["x", "y"], "label": 0}'
    (tmp_path / "bad_label.jsonl").write_text('{"context": "a", "choices": ["x", "y"], "label": 3}\n')
    (tmp_path / "bad_json.jsonl").write_text(good + '\n{"context": "a",\n')
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
    (None, [*FILE_DATA, "data.sources.text.data_files=[{tmp}/nope.txt]"], "nope.txt"),
    (None, [*FILE_DATA, "data.sources.text.data_files=[{tmp}/empty.txt]"], "empty.txt: file is empty"),
    (None, [*FILE_DATA, "data.sources.text.data_files=[{tmp}/latin1.txt]"], "latin1.txt: not UTF-8"),
    (None, ["data.sources.stdlib.weight=-1"], "data.sources.stdlib.weight must be a number >= 0, got -1.0"),
    (None, ["model.balancing=loss_free"], "model.balancing must be one of aux_global, aux_per_router, bias, none"),
    (None, ["model.capacity_factor=-1"], "model.capacity_factor must be a positive number or null (dropless)"),
    (None, ["model.bias_update_rate=-1"], "model.bias_update_rate must be a non-negative number, got -1.0"),
    (None, ["data.sources.stdlib.weight=0"], "data.sources: the weights (stdlib=0.0) must sum to a positive number"),
    (None, ["data.sources.web.kind=stdlib", "data.sources.web.weight=0"],
     "data.sources.web.weight is 0 and no data.phases entry gives it a weight"),
    (None, ["data.phases=[{{start: 4, weights: {{web: 1}}}}]"], "data.phases[0].weights: unknown source 'web'"),
    (None, ["data.phases=[{{start: 6, weights: {{stdlib: 1}}}}, {{start: 0.5, weights: {{stdlib: 2}}}}]"],
     "data.phases[1].start (0.5 = step 4) must come after data.phases[0] (step 6)"),
    (None, ["model.vocab_size=300", "data.tokenizer_path={tmp}/tok400.json"], "> model.vocab_size 300"),
    (None, ["run.output_dir={tmp}/a_file/runs"], "cannot write the run directory"),
    (None, ["downstream.tasks=[{{name: mine}}]"], "downstream.tasks[0].name: 'mine' is not a built-in task"),
    (None, ["downstream.every_n_steps=-5"], "downstream.every_n_steps must be >= 0"),
    (None, ["model.upcycle_from={tmp}/nope"],
     "model.upcycle_from: {tmp}/nope is neither a run directory (with hf/) nor a model directory (with config.json)"),
    (None, ["downstream.tasks=[{{name: mine, path: {tmp}/nope.jsonl}}]"], "'mine': {tmp}/nope.jsonl: file not found"),
    (None, ["downstream.tasks=[{{name: mine, path: {tmp}/bad_json.jsonl}}]"], "bad_json.jsonl:2: not valid JSON"),
    (None, ["downstream.tasks=[{{name: mine, path: {tmp}/bad_label.jsonl}}]"],
     "bad_label.jsonl:1: 'label' 3 is outside the 2 choices (0..1)"),
    (None, ["trainer.strategy=fsdp", "trainer.expert_parallel=2", "trainer.devices=3"],
     "trainer.expert_parallel (2) must divide the number of ranks, trainer.devices × trainer.num_nodes (3)"),
    (None, ["trainer.strategy=fsdp", "trainer.expert_parallel=2", "trainer.devices=1"],  # no distributed launch
     "trainer.expert_parallel (2) must divide the number of ranks, trainer.devices × trainer.num_nodes (1)"),
    (None, ["trainer.devices=0"], "trainer.devices must be a number of devices > 0, -1 (all), auto, or comma-"),
    (None, ["trainer.accelerator=bogus"], "trainer.accelerator must be one of auto, cpu, gpu, cuda, mps, tpu, got"),
    (None, ["trainer.expert_parallel_attention=true"],
     "trainer.expert_parallel_attention needs trainer.expert_parallel > 1, got 1"),
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
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], err[-2000:]
    assert "Traceback" not in err
    if "downstream" in message or ".jsonl" in message:
        assert not (tmp_path / "runs").exists()  # a bad task stops the run before anything is written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{tmp}"], "is neither a run directory"),
        (["eval", "{run}", "{tmp}/nope.txt"], "file not found: "),
        (["eval", "{run}", "{tmp}/empty.txt"], "empty.txt: file is empty"),
        (["report", "{tmp}"], "no expert_utilization.json"),
        (["eval", "{run}"], "name text files to score, --tasks, or both"),
        (["eval", "{run}", "--tasks", "{tmp}/nope.jsonl"], "nope.jsonl: file not found"),
        (["eval", "{run}", "--tasks", "{tmp}/nope.yaml"], "nope.yaml: file not found (expected an lm-eval task YAML)"),
        (["eval", "{run}", "--tasks", "{tmp}/bad_label.jsonl"], "bad_label.jsonl:1: 'label' 3 is outside the 2 choices"),
        (["eval", "{run}", "--tasks", "stdlib_next_line,{tmp}/bad_json.jsonl"], "bad_json.jsonl:2: not valid JSON"),
        (["eval", "{run}", "--tasks", "hellaswg"], "--tasks: unknown task 'hellaswg' (did you mean 'hellaswag'"),
        (["eval", "{run}", "--tasks", "stdlib_next_line", "--limit", "0"], "argument --limit: must be in [1, inf), got 0"),
        (["train", DEFAULT, "run.output_dir={runs}", "run.name=tiny"], "already holds a run: pass --resume"),
        (["train", DEFAULT, *TINY, "run.output_dir={tmp}", "--resume"], "--resume: no checkpoint in"),
        (["train", DEFAULT, *TINY, "model.hidden_size=32", "run.output_dir={runs}", "run.name=tiny", "--resume"],
         "--resume: model.hidden_size is 32, but the run in"),
        (["train", DEFAULT, "--resume", *TINY, "model.hidden_size=32", "run.output_dir={runs}", "run.name=tiny"],
         "--resume: model.hidden_size is 32, but the run in"),  # overrides after a flag are overrides too
        (["report", "{run}", "a=b"], "jetmoe: unrecognized arguments: a=b"),  # a command without overrides
        (["plan", DEFAULT, "--gpus", "2", "model=tiny", "--nope"], "jetmoe: unrecognized arguments: --nope"),
        (["consolidate", "{run}"], "last.ckpt: a single-file checkpoint, of a run without trainer.strategy=fsdp"),
        (["consolidate", "{run}", "--checkpoint", "lats.ckpt"], "lats.ckpt: no such checkpoint (found: best-step8"),
        (["generate", "{run}", "--seed", "99999999999999999999999"],
         "argument --seed: must be in [0, 9223372036854775808), got 99999999999999999999999"),
        (["generate", "{run}", "--seed", "-1"], "argument --seed: must be in [0, 9223372036854775808), got -1"),
        (["eval", "{run}", "--tasks", "stdlib_next_line", "--device", "bogus"],
         "argument --device: expected cpu, cuda, cuda:N or mps, got 'bogus'"),
        (["eval", "{run}", "--tasks", "stdlib_next_line", "--device", "cuda:99"],
         "argument --device: 'cuda:99' is not available: this torch sees"),
        (["generate", "{run}", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["generate", "{run}", "--temperature", "0"], "argument --temperature: must be in (0, inf), got 0"),
        (["generate", "{run}", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be in [0, inf), got -1"),
        (["generate", "{run}", "--top-k", "x"], "argument --top-k: expected an integer, got 'x'"),
        (["eval", "{run}", "{tmp}/empty.txt", "--batch-size", "0"], "argument --batch-size: must be in [1, inf)"),
        (["plan", DEFAULT, "--gpus", "0"], "argument --gpus: must be in [1, inf), got 0"),
        (["plan", DEFAULT, "--mfu", "1.5"], "argument --mfu: must be in (0, 1], got 1.5"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_other_commands_fail_cleanly(tiny_run, tmp_path, capsys, argv, message):
    _files(tmp_path)
    run_dir = tiny_run[0]
    argv = [a.format(tmp=tmp_path, run=run_dir, runs=run_dir.parent) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("jetmoe: error: ") == 1 and message in err and "Traceback" not in err


def test_an_error_raised_after_the_trainer_is_built_is_the_only_stderr_line(tiny_run, tmp_path):
    """The --resume check runs once Lightning's Trainer exists, which logs its hardware summary (``GPU available:
    False, used: False``): `jetmoe` drops those lines, so the error is all the user sees."""
    run_dir, _ = tiny_run
    result = jetmoe("train", DEFAULT, *TINY, "model.hidden_size=32", f"run.output_dir={run_dir.parent}",
                    "run.name=tiny", "--resume", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"jetmoe: error: --resume: model.hidden_size is 32, but the run in {run_dir} was trained with 64 (its "
        "checkpoints have that architecture)"
    ]


def test_eval_device_cuda_without_cuda_names_the_flag(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(tiny_run[0]), "--tasks", "stdlib_next_line", "--device", "cuda"]) == 2
    assert "argument --device: 'cuda' is not available: this torch sees 0 CUDA device(s)" in _last_error(
        capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a GPU-less machine")
def test_accelerator_gpu_without_a_gpu_names_the_key(tmp_path, capsys):
    """Lightning's own error ("No supported gpu backend found!") names no key: `jetmoe` adds it, and what to do."""
    assert main(["train", DEFAULT, *TINY, "trainer.accelerator=gpu", f"run.output_dir={tmp_path}/runs",
                 f"data.cache_dir={tmp_path}/cache"]) == 2
    assert "trainer.accelerator: No supported gpu backend found! (gpu needs a CUDA or MPS device" in _last_error(
        capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_bug_keeps_its_traceback_and_exits_1(tiny_run, monkeypatch):
    """Only bad input is a one-line error; anything else is a bug, and `main` lets it through (exit status 1, the
    traceback printed by Python)."""
    import jetmoe.training.run as run

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(run, "load_run_model", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["generate", str(tiny_run[0]), "--max-new-tokens", "2"])
    result = jetmoe("report", str(tiny_run[0] / "expert_utilization.json"), "--nope", cwd=tiny_run[0])
    assert result.returncode == 2 and result.stderr.count("jetmoe: error: ") == 1


def test_eval_tasks_without_lm_eval_say_how_to_install_it(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(tiny_run[0]), "--tasks", "stdlib_next_line"]) == 2
    err = capsys.readouterr().err
    assert "jetmoe: error: --tasks needs lm-evaluation-harness: pip install 'jetmoe[eval]'" in err


# ----------------------------------------------------------------------------- jetmoe prepare


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _last_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("jetmoe: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def test_prepare_tokenizes_once_and_reports_tokens_per_source(tmp_path, capsys, caplog):
    args = ["prepare", DEFAULT, *TINY, f"data.cache_dir={tmp_path}/cache"]
    with caplog.at_level("INFO", logger="jetmoe.data"):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "prepare: training a BPE of vocab 512" in caplog.text and "prepare stdlib: done," in caplog.text
    row = next(line for line in out.splitlines() if line.startswith("stdlib "))
    assert "1 new/1" in row and row.rstrip().endswith("MB")
    assert out.splitlines()[-1].startswith("total") and f"{tmp_path}/cache/store-bpe-" in out
    assert main([*args, "--source", "stdlib"]) == 0
    assert "1 kept" in capsys.readouterr().out  # prepared already: nothing is read or tokenized again
    assert main([*args, "--source", "web"]) == 2
    assert "--source 'web' is not a source of this experiment (stdlib)" in _last_error(capsys.readouterr().err)


def test_a_store_of_another_tokenizer_or_a_damaged_shard_fails_cleanly_and_keeps_the_store(tmp_path, capsys):
    store = tmp_path / "store"
    common = [*TINY, f"data.store_dir={store}", f"data.cache_dir={tmp_path}/cache", f"run.output_dir={tmp_path}/runs"]
    assert main(["prepare", DEFAULT, *common]) == 0
    capsys.readouterr()
    before = _store_files(store)

    assert main(["train", DEFAULT, *common, "model.vocab_size=600"]) == 2
    assert f"data.store_dir {store}: prepared for another tokenizer" in _last_error(capsys.readouterr().err)
    assert main(["prepare", DEFAULT, *common, "model.vocab_size=600"]) == 2
    assert "not this run's (a BPE of vocab 600" in _last_error(capsys.readouterr().err)
    assert _store_files(store) == before

    shard = next(store.glob("stdlib-*/train-00000.bin"))
    shard.write_bytes(shard.read_bytes()[:-4])
    assert main(["train", DEFAULT, *common]) == 2
    assert "train-00000.bin: shard of source 'stdlib' is truncated" in _last_error(capsys.readouterr().err)
    shard.unlink()
    assert main(["train", DEFAULT, *common]) == 2
    assert "train-00000.bin: shard of source 'stdlib' is missing" in _last_error(capsys.readouterr().err)
    assert main(["prepare", DEFAULT, *common]) == 0  # rebuilds exactly the missing shard
    assert "1 new/1" in capsys.readouterr().out and _store_files(store) == before


def test_plan_compares_fsdp_alone_with_each_expert_parallel_degree(capsys):
    plan = ["plan", str(REPO / "experiments/jetmoe_8b.yaml"), "model.num_local_experts=64", "trainer.expert_parallel=8"]
    assert main([*plan, "--gpus", "128"]) == 0
    out = capsys.readouterr().out
    assert "MoE experts split over 8 devices (inside a node), FSDP over 16" in out
    table = out[out.index("expert_parallel  all-gather GB"):].splitlines()
    assert [row.split()[0] for row in table[1:-1]] == ["1", "2", "4", "8", "16", "32", "64"]
    assert table[4].startswith("8 (configured)")
    assert table[-1].endswith("moves the fewest bytes; inside a node, expert_parallel=8")
    for argv in ([*plan, "--gpus", "12"], [*plan[:-1], "--gpus", "12", plan[-1]]):  # overrides before or after flags
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == "jetmoe: error: trainer.expert_parallel (8) must divide --gpus (12)"
