"""The ``jetmoe`` command: prepare, train, generate, eval, report, sweep, plan, consolidate.

The only module that reads argv, prints and sets exit codes. Bad input (a config key, a flag, a file: every
`jetmoe.errors.UserError`) prints ``jetmoe: error: <one line>`` on stderr and exits with status 2, without a
traceback; a run that failed through no fault of its input (`RunFailure`: its loss diverged, the disk filled up)
prints one line and exits with status 1; anything else is a bug and keeps its traceback.

    jetmoe prepare experiments/default.yaml [key=value ...] [--source NAME ...]
    jetmoe train experiments/default.yaml [key=value ...] [group=name ...] [--resume]
    jetmoe generate runs/default --prompt "def " [--max-new-tokens 200 --temperature 0.8 --top-k 50 --greedy]
    jetmoe eval runs/default data.txt [more.txt ...] [--seq-len 256 --batch-size 8]
    jetmoe eval runs/default --tasks stdlib_next_line,hellaswag,my_task.jsonl [--num-fewshot 0 --limit 100]
    jetmoe report runs/default
    jetmoe sweep experiments/ablate_experts_smoke.yaml [key=value ...]
    jetmoe plan experiments/jetmoe_8b.yaml --gpus 96 [--gpu-memory-gb 80 --mfu 0.4 --gpus-per-node 8]
    jetmoe consolidate runs/big [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

from jetmoe.errors import RunFailure, UserError

USAGE_ERROR, RUN_FAILED = 2, 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
        _configure_logging()
        args.command(args)
    except _user_errors() as err:
        _print_error(err if isinstance(err, UserError) else _with_trainer_key(err))
        return USAGE_ERROR
    except RunFailure as err:
        _print_error(err)
        return RUN_FAILED
    return 0


def _print_error(err: BaseException) -> None:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"jetmoe: error: {message}", file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    """`UserError`, and Lightning's MisconfigurationException (e.g. ``accelerator: gpu`` without a GPU)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return UserError, MisconfigurationException


#: (fragment of a Lightning MisconfigurationException, the config key it is about, what to do); first match wins.
_LIGHTNING_KEYS = (
    ("no supported gpu backend", "trainer.accelerator", "gpu needs a CUDA or MPS device torch can see; else use cpu"),
    ("devices", "trainer.devices", ""),
    ("you requested gpu", "trainer.devices", ""),
    ("accelerator", "trainer.accelerator", ""),
)


def _with_trainer_key(err: BaseException) -> UserError:
    """Lightning's configuration error, naming the ``trainer.*`` key it is about: Lightning names its own
    `Trainer` arguments (``accelerator``, ``devices``), or nothing at all ("No supported gpu backend found!")."""
    message = " ".join(str(err).split())
    for fragment, key, hint in _LIGHTNING_KEYS:
        if fragment in message.lower():
            return UserError(f"{key}: {message}{f' ({hint})' if hint else ''}")
    return UserError(message)


#: Lightning's info lines that are noise here: advertising tips, and the hardware summary printed when a Trainer is
#: built (``GPU available: False, used: False``), which would precede a one-line error raised after it.
_LIGHTNING_NOISE = re.compile(r"💡 Tip|(GPU|TPU|HPU|IPU) available: ")


def _configure_logging() -> None:
    """Plain ``message`` lines on stderr for jetmoe and Lightning alike, without Lightning's
    advertising tips, hardware summary and known-harmless warnings."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import lightning  # noqa: F401  (adds its own console handler, which would print every line twice)

    logging.getLogger("lightning").handlers.clear()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not _LIGHTNING_NOISE.match(record.getMessage()))
    for message in (
        r".*does not have many workers.*",  # the data is pre-tokenized in memory: workers don't help
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # torch vs Lightning internals
    ):
        warnings.filterwarnings("ignore", message=message)


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s: one line naming the argument, exit status 2."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`parse_args`, except that ``KEY=VALUE`` overrides may also follow a flag (``--resume trainer.max_steps=5``):
    argparse fills a positional list only before the first flag and leaves the rest over (and its
    `parse_intermixed_args` refuses subcommands)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides += overrides
    return args


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` number within the bounds (open or closed), else a one-line error."""
    interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}" \
               f"{')' if high_open or high is None else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has. lm-eval silently falls back to its default for a name it
    does not know, and asserts on a CUDA device that torch cannot reach."""
    import torch

    expected = "expected cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if device.type == "cpu":
        return "cpu"  # lm-eval knows "cpu", not "cpu:0"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this torch sees {count} CUDA device(s)")
    elif device.type != "mps" or not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{expected} (a device this machine has), got {text!r}")
    return str(device)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jetmoe", description="Train and use JetMoE models.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("prepare", help="tokenize an experiment's sources into its token store (resumable)")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides or group swaps, as for train")
    p.add_argument("--source", action="append", default=[], metavar="NAME",
                   help="prepare only this source (repeatable): one machine per source of a large mixture")
    p.set_defaults(command=_prepare)

    p = commands.add_parser("train", help="train an experiment YAML (preparing its token store when missing)")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides (optim.lr=1e-3) or group swaps (model=tiny)")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/last.ckpt")
    p.set_defaults(command=_train)

    p = commands.add_parser("generate", help="generate text from a run or an HF model directory")
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=200)
    p.add_argument("--temperature", type=_number(float, 0, low_open=True), default=0.8)
    p.add_argument("--top-k", type=_number(int, 0), default=50, help="0 disables")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=None, help="in (0, 1]; 1 disables")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache and a compiled decode step: faster per token, after a compilation of seconds")
    p.add_argument("--seed", type=_number(int, 0, 2**63, high_open=True), default=0)  # torch seeds are int64
    p.set_defaults(command=_generate)

    p = commands.add_parser("eval", help="perplexity on text files and/or lm-evaluation-harness tasks")
    p.add_argument("model_dir", metavar="DIR", help="a run directory (results go to DIR/eval) or an HF model directory")
    p.add_argument("files", nargs="*", metavar="FILE", help="text files or globs: loss and perplexity")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks, built-in tasks (stdlib_next_line) or task files (.jsonl, .yaml), comma-separated")
    p.add_argument("--num-fewshot", type=_number(int, 0), default=None,
                   help="--tasks: examples in each prompt (lm-eval's default)")
    p.add_argument("--limit", type=_number(int, 1), default=None, help="--tasks: score the first N items of each task")
    p.add_argument("--device", type=_device, default=None,
                   help="--tasks: cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seq-len", type=_number(int, 2), default=None,
                   help="files: window length (default: the run's data.seq_len)")
    p.add_argument("--batch-size", type=_number(int, 1), default=8)
    p.add_argument("--output-dir", default=None, help="where results are written (default: RUN_DIR/eval)")
    p.set_defaults(command=_eval)

    p = commands.add_parser("report", help="expert-utilization table and figures (PNG) of a finished run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(command=_report)

    p = commands.add_parser("sweep", help="train every point of a sweep YAML (resumable), then tabulate them")
    p.add_argument("sweep", help="sweep YAML, e.g. experiments/ablate_experts_smoke.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides for every point; sweep_dir=DIR and only=a,b change the sweep itself")
    p.set_defaults(command=_sweep)

    p = commands.add_parser("plan", help="per-device memory and tokens/day of an experiment on a cluster")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/jetmoe_8b.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--gpus", type=_number(int, 1), default=8, help="total devices")
    p.add_argument("--gpu-memory-gb", type=_number(float, 0, low_open=True), default=80.0)
    p.add_argument("--peak-tflops", type=_number(float, 0, low_open=True), default=989.0,
                   help="bf16 dense peak per device (H100 SXM: 989)")
    p.add_argument("--mfu", type=_number(float, 0, 1, low_open=True), default=0.4,
                   help="assumed model FLOPs utilisation, in (0, 1]")
    p.add_argument("--gpus-per-node", type=_number(int, 1), default=8,
                   help="devices per node (whether an expert-parallel group stays inside one)")
    p.set_defaults(command=_plan)

    p = commands.add_parser("consolidate", help="one HF-format directory from a run's sharded (FSDP) checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", default="last.ckpt", help="checkpoint name under RUN_DIR/checkpoints")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/hf)")
    p.set_defaults(command=_consolidate)

    return parser


# ----------------------------------------------------------------------------- commands


def _prepare(args: argparse.Namespace) -> None:
    from jetmoe.training.config import load_config
    from jetmoe.training.run import prepare

    summaries = prepare(load_config(args.experiment, args.overrides), args.source)
    print(f"{'source':<16} {'train tokens':>15} {'val tokens':>13} {'documents':>11} {'shards':>11} {'disk':>10}")
    for s in summaries:
        shards = f"{s.built_shards} new/{s.shards}" if s.built_shards else f"{s.shards} kept"
        print(f"{s.name:<16} {s.tokens['train']:>15,} {s.tokens['val']:>13,} "
              f"{s.documents['train'] + s.documents['val']:>11,} {shards:>11} {s.bytes / 1e6:>8,.1f}MB")
    total = sum(s.tokens["train"] + s.tokens["val"] for s in summaries)
    disk = sum(s.bytes for s in summaries)
    print(f"{'total':<16} {total:>29,} tokens {disk / 1e6:>27,.1f}MB  in {summaries[0].path.parent}")


def _train(args: argparse.Namespace) -> None:
    from jetmoe.training.config import load_config, to_yaml

    cfg = load_config(args.experiment, args.overrides)
    print(f"# resolved config ({args.experiment})\n{to_yaml(cfg)}", flush=True)

    from jetmoe.training.run import train

    summary = train(cfg, resume=args.resume)
    if "metrics" in summary:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    minutes, seconds = divmod(m["wall_time_s"], 60)
    print(
        f"\n== finished step {m['step']} in {int(minutes)}m{seconds:04.1f}s ==\n"
        f"val/loss {_num(m['val_loss'])}  val/ppl {_num(m['val_ppl'], '.2f')}  train/loss {_num(m['train_loss'])}\n"
        f"tokens {m['tokens_seen']:,}  ({_num(m['tokens_per_sec'], ',.0f')} tokens/s)  "
        f"params {m['params_total']:,} total, {m['params_active']:,} active\n"
        f"run dir      {summary['run_dir']}  (config.yaml, metrics.json, expert_utilization.json)\n"
        f"checkpoints  {summary['checkpoints']}\n"
        f"hf export    {summary['hf_dir']}\n"
        f"tensorboard  tensorboard --logdir {summary['tensorboard']}\n"
        f"report       jetmoe report {summary['run_dir']}"
    )
    if "sample" in summary:
        print(f"\n== sample ==\n{summary['sample']}")


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _generate(args: argparse.Namespace) -> None:
    from jetmoe.training.run import generate

    print(generate(
        args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, do_sample=not args.greedy, seed=args.seed, compile=args.compile,
    ))


def _eval(args: argparse.Namespace) -> None:
    from jetmoe.training.run import eval_output_dir, evaluate, evaluate_tasks, write_eval_result

    tasks = [task.strip() for task in (args.tasks or "").split(",") if task.strip()]
    if not args.files and not tasks:
        raise UserError("jetmoe eval: name text files to score, --tasks, or both")
    out = eval_output_dir(args.model_dir, args.output_dir)
    if args.files:
        result = evaluate(args.model_dir, args.files, seq_len=args.seq_len, batch_size=args.batch_size)
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  tokens {result['tokens']:,}")
        if out is not None:
            print(f"wrote {write_eval_result(out, 'perplexity', {'files': args.files, **result})}")
    if tasks:
        from jetmoe.eval.harness import format_results

        results, written = evaluate_tasks(args.model_dir, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          batch_size=args.batch_size, device=args.device, output_dir=out)
        print(format_results(results))
        if written is not None:
            print(f"wrote {written}")


def _sweep(args: argparse.Namespace) -> None:
    from jetmoe.training.sweep import format_table, run_sweep

    result = run_sweep(args.sweep, args.overrides)
    print(format_table(result))


def _plan(args: argparse.Namespace) -> None:
    from jetmoe.distributed import estimate, format_plan
    from jetmoe.distributed.plan import expert_parallel_options, format_expert_parallel_options
    from jetmoe.training.config import build_model_config, load_config

    cfg = load_config(args.experiment, args.overrides)
    t, d = cfg.trainer, cfg.data
    tokens_per_step = d.seq_len * d.batch_size * t.accumulate_grad_batches * args.gpus
    config = build_model_config(cfg.model)
    plan = dict(
        seq_len=d.seq_len, global_batch_tokens=tokens_per_step, micro_batch_size=d.batch_size, gpus=args.gpus,
        gpu_memory_gb=args.gpu_memory_gb, precision=t.precision,
        activation_checkpointing="full" if cfg.model.gradient_checkpointing else "none",
        peak_tflops=args.peak_tflops, mfu=args.mfu, expert_parallel_attention=t.expert_parallel_attention,
        gpus_per_node=args.gpus_per_node,
    )
    names = {"expert_parallel": "trainer.expert_parallel", "gpus": "--gpus"}  # as this command's user spells them
    print(format_plan(estimate(config, **plan, expert_parallel=t.expert_parallel, names=names)))
    print(f"\n{format_expert_parallel_options(expert_parallel_options(config, **plan), t.expert_parallel)}")


def _consolidate(args: argparse.Namespace) -> None:
    from jetmoe.distributed import consolidate
    from jetmoe.training.config import build_model_config, load_run_config
    from jetmoe.training.report import complete_export

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    out = Path(args.out) if args.out else run_dir / "hf"
    config = build_model_config(cfg.model)
    consolidate(run_dir / "checkpoints" / args.checkpoint, out, config)
    tokenizer = run_dir / "hf" / "tokenizer.json"
    if tokenizer.is_file():  # tokenizer files, generation config, model card and figures
        complete_export(run_dir, out, config, tokenizer)
    print(f"wrote {out} (config.json, model.safetensors{', tokenizer, model card' if tokenizer.is_file() else ''})")


def _report(args: argparse.Namespace) -> None:
    from jetmoe.training.expert_callback import format_report
    from jetmoe.training.report import write_figures

    metrics_file = Path(args.run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    losses = {k: metrics[k] for k in ("train_loss", "val_loss") if metrics.get(k) is not None}
    print(format_report(args.run_dir, final_losses=losses or None))
    figures = write_figures(args.run_dir)
    if figures:
        print("\nfigures\n" + "\n".join(f"  {path}  ({caption})" for caption, path in figures.items()))


if __name__ == "__main__":
    sys.exit(main())
