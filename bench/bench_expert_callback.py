"""Overhead of expert-utilization tracking: training tokens/s of an experiment with the callback on vs off.

    python bench/bench_expert_callback.py                      # default experiment, 5 rounds of 150 steps
    python bench/bench_expert_callback.py --steps 40 --rounds 1 experiments/default.yaml model=tiny

Trains the experiment in this process with `run.expert_metrics=true` and `=false`, alternating (the order flips
every round, so a drift in machine load hits both sides alike), after one untimed warm-up run that also builds
the tokenized-data cache. Each run's figure is the fit's tokens/s as `metrics.json` reports it (training loop
with its validations; data preparation, export and sampling excluded). The slowdown is 1 - the median over
rounds of (on / off) within a round: the two runs of a round are adjacent in time, so drifts in machine speed
cancel better than between medians of all runs. Also reported: the wall time spent inside the callback's hooks
as a share of the fit, a direct measurement (the router logits it reads are computed for the auxiliary loss
anyway).
Writes `<out-dir>/expert_callback.{json,md}` (default `bench/results/`), `--publish` also
`bench/EXPERT_CALLBACK.md`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_vs_transformers import BENCH_DIR, log, machine_name
from jetmoe.training.config import load_config
from jetmoe.training.expert_callback import ExpertUtilizationCallback
from jetmoe.training.run import train

TARGET_SLOWDOWN = 0.03
HOOK_SECONDS = [0.0]  # wall time inside ExpertUtilizationCallback's hooks since the last reset


def time_hooks(cls: type) -> None:
    """Wrap every Lightning hook `cls` defines (and its checkpoint state) to add its wall time to HOOK_SECONDS."""
    for name, fn in list(vars(cls).items()):
        if callable(fn) and (name.startswith("on_") or name in ("setup", "state_dict")):
            @functools.wraps(fn)
            def timed(*args, _fn=fn, **kwargs):
                start = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    HOOK_SECONDS[0] += time.perf_counter() - start
            setattr(cls, name, timed)


def run_once(experiment: str, overrides: list[str], steps: int, on: bool, output_dir: str, name: str) -> dict:
    """One training run; its tokens/s and the share of its fit spent inside the callback's hooks."""
    cfg = load_config(experiment, [
        *overrides, f"trainer.max_steps={steps}", f"run.expert_metrics={str(on).lower()}", "run.sample_tokens=0",
        f"run.output_dir={output_dir}", f"run.name={name}",
    ])
    HOOK_SECONDS[0] = 0.0
    metrics = train(cfg)["metrics"]
    return {"tokens_per_s": metrics["tokens_per_sec"], "hook_share": HOOK_SECONDS[0] / metrics["train_time_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", nargs="?", default="experiments/default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the experiment")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=5, help="pairs of (on, off) runs")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--publish", action="store_true", help="also write the markdown to bench/EXPERT_CALLBACK.md")
    args = p.parse_args(argv)

    time_hooks(ExpertUtilizationCallback)
    tokens_per_s: dict[str, list[float]] = {"on": [], "off": []}
    hook_shares: list[float] = []
    with tempfile.TemporaryDirectory() as output_dir:
        warmup_steps = min(args.steps, 30)
        log(f"warm-up run ({warmup_steps} steps)")
        run_once(args.experiment, [*args.overrides, "optim.warmup_steps=0"], warmup_steps, True, output_dir, "warmup")
        for r in range(args.rounds):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                log(f"round {r + 1}/{args.rounds}: callback {side}, {args.steps} steps")
                run = run_once(args.experiment, args.overrides, args.steps, side == "on", output_dir, f"r{r}_{side}")
                tokens_per_s[side].append(run["tokens_per_s"])
                if side == "on":
                    hook_shares.append(run["hook_share"])
    on, off = statistics.median(tokens_per_s["on"]), statistics.median(tokens_per_s["off"])
    paired = [a / b for a, b in zip(tokens_per_s["on"], tokens_per_s["off"])]
    slowdown, hook_share = 1 - statistics.median(paired), statistics.median(hook_shares)
    result = {
        "machine": machine_name(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
        "experiment": args.experiment, "overrides": args.overrides, "steps": args.steps, "rounds": args.rounds,
        "tokens_per_s": tokens_per_s, "median_on": on, "median_off": off, "slowdown": slowdown,
        "paired_ratios": paired, "hook_shares": hook_shares, "hook_share": hook_share,
        "target_slowdown": TARGET_SLOWDOWN, "met": slowdown < TARGET_SLOWDOWN,
    }
    markdown = "\n".join([
        "# Expert-utilization callback overhead",
        "",
        f"- machine: {result['machine']}, {result['torch_threads']} torch threads; {result['date']}",
        f"- command: `{result['command']}`",
        f"- {args.experiment} {' '.join(args.overrides)}: {args.rounds} rounds x {args.steps} steps per side",
        "",
        "| callback | tokens/s (median) | runs |",
        "|---|---:|---|",
        f"| off | {off:,.0f} | {', '.join(f'{t:,.0f}' for t in tokens_per_s['off'])} |",
        f"| on | {on:,.0f} | {', '.join(f'{t:,.0f}' for t in tokens_per_s['on'])} |",
        "",
        f"Slowdown with the callback: **{100 * slowdown:.1f} %** (1 - median of the per-round on/off ratios "
        f"{', '.join(f'{r:.3f}' for r in paired)}; target < {100 * TARGET_SLOWDOWN:.0f} %: "
        f"{'met' if result['met'] else 'not met'}). Time inside its hooks: **{100 * hook_share:.2f} %** of the "
        "fit (median of the 'on' runs).",
        "",
    ])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "expert_callback.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "expert_callback.md").write_text(markdown)
    if args.publish:
        (BENCH_DIR / "EXPERT_CALLBACK.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
