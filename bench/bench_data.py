"""The data pipeline's four targets: prepare throughput, prepare memory, loading share of a step, mixture shares.

    python bench/bench_data.py                 # 100 MB / 1 GB of generated text, about 15 minutes on 2 cores
    python bench/bench_data.py --quick         # smoke run: a few MB, a tiny model

The text is generated locally from the running interpreter's standard library (its `.py` files, repeated with a
copy number in every document so no two documents are equal), as JSON lines: no network.

1. Prepare throughput: `jetmoe.data.prepare_store` of the --throughput-mb corpus (a tokenizer.json given, so no
   BPE training in the timing) against the ceiling measured in the same run: `tokenizers`' own
   `encode_batch_fast` (and `encode_batch`) on the same documents already in memory, in batches of 1M characters,
   both cores (its Rust thread pool). The ceiling is timed before and after prepare; the faster is the reference.
   Target: >= 0.8x.
2. Peak resident memory of the `jetmoe prepare` command (a subprocess, its ru_maxrss from wait4) on
   --rss-mb corpora (default 100 MB and 1 GB). Target: the largest <= 1.2x the smallest, and < 1.5 GB.
3. Loading share: the default experiment trains --steps steps from its prepared store; the wall time spent in the
   train loader's `__getitem__` (reading windows from the memory-mapped shards, position ids, tensors) over the
   fit's training time. Target: <= 2 %.
4. Mixture shares: three sources weighted 0.5 / 0.3 / 0.2, then 0.2 / 0.2 / 0.6 from step 1,250: the sources of
   the rows the train loader hands out, counted over 10,000 windows of each phase, and the first batch of phase 2.
   Target: within +-1 % absolute, and the switch at exactly step 1,250.

Writes `<out-dir>/data.{json,md}` (default `bench/results/`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_vs_transformers import BENCH_DIR, log, machine_name
from jetmoe.data import DataConfig, JetMoeDataModule, PhaseConfig, SourceConfig, SpecialTokens, prepare_store
from jetmoe.data.datamodule import TrainBatches
from jetmoe.data.sources import read_lenient, stdlib_files
from jetmoe.data.tokenizer import train_tokenizer
from jetmoe.training.config import load_config
from jetmoe.training.run import train

import torch

REPO = BENCH_DIR.parent
TARGETS = {"throughput": 0.8, "rss_ratio": 1.2, "rss_bytes": 1.5e9, "loading_share": 0.02, "share_error": 0.01}
CEILING_BATCH_CHARS = 1 << 20


def write_corpus(path: Path, megabytes: float) -> int:
    """JSON lines of stdlib files until `megabytes` of text; returns the number of characters."""
    docs = [read_lenient(p) for p in stdlib_files()]
    target, chars, copy = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while chars < target:
            for doc in docs:
                text = f"# copy {copy}\n{doc}"
                f.write(json.dumps({"text": text}) + "\n")
                chars += len(text)
                if chars >= target:
                    break
            copy += 1
    return chars


def corpus_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def ceiling(tokenizer, docs: list[str], fast: bool) -> float:
    """tokens/s of encode_batch(_fast) on `docs` in memory, batches of CEILING_BATCH_CHARS characters."""
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    tokens, batch, size = 0, [], 0
    start = time.perf_counter()
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= CEILING_BATCH_CHARS:
            tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
            batch, size = [], 0
    tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    return tokens / (time.perf_counter() - start)


def source_config(corpus: Path, tokenizer_path: Path, store: Path) -> DataConfig:
    return DataConfig(sources={"corpus": SourceConfig(kind="files", data_files=[str(corpus)])},
                      tokenizer_path=str(tokenizer_path), store_dir=str(store), cache_dir=str(store.parent / "cache"))


def bench_throughput(work: Path, megabytes: float, tokenizer_path: Path) -> dict:
    corpus = work / "throughput.jsonl"
    chars = write_corpus(corpus, megabytes)
    from jetmoe.data.tokenizer import read_tokenizer

    tokenizer = read_tokenizer(tokenizer_path)
    docs = corpus_docs(corpus)
    log(f"throughput: ceiling on {chars / 1e6:.0f}M characters in memory")
    before = ceiling(tokenizer, docs, fast=True)
    slow = ceiling(tokenizer, docs, fast=False)
    del docs
    cfg = source_config(corpus, tokenizer_path, work / "store-throughput")
    log("throughput: prepare_store")
    wall, cpu = time.perf_counter(), time.process_time()
    (summary,) = prepare_store(cfg, vocab_size=4096, special=SpecialTokens())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    docs = corpus_docs(corpus)
    after = ceiling(tokenizer, docs, fast=True)
    tokens = summary.tokens["train"] + summary.tokens["val"] - summary.documents["train"] - summary.documents["val"]
    best = max(before, after)
    return {"chars": chars, "prepare_tokens_per_s": tokens / wall, "prepare_cpu_per_wall": cpu / wall,
            "ceiling_fast_tokens_per_s": [before, after], "ceiling_encode_batch_tokens_per_s": slow,
            "ratio": tokens / wall / best, "prepare_wall_s": wall}


def prepare_rss(work: Path, megabytes: float, tokenizer_path: Path) -> dict:
    """Peak RSS of `jetmoe prepare` on a corpus of `megabytes` (a fresh subprocess)."""
    corpus = work / f"rss-{megabytes:g}.jsonl"
    chars = write_corpus(corpus, megabytes)
    experiment = work / f"rss-{megabytes:g}.yaml"
    experiment.write_text(
        f"data:\n  sources:\n    corpus:\n      kind: files\n      data_files: [{corpus}]\n"
        f"  tokenizer_path: {tokenizer_path}\n  store_dir: {work / f'store-rss-{megabytes:g}'}\n"
        f"  cache_dir: {work / 'cache'}\n"
    )
    log(f"memory: jetmoe prepare on {chars / 1e6:.0f}M characters")
    start = time.perf_counter()
    with open(work / "prepare.log", "w+b") as stderr:  # a file, not a pipe: its progress lines never block it
        proc = subprocess.Popen([sys.executable, "-m", "jetmoe.cli", "prepare", str(experiment)], cwd=work,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            raise RuntimeError(f"jetmoe prepare failed: {stderr.read().decode()[-2000:]}")
    corpus.unlink()
    return {"chars": chars, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - start}


def bench_loading(work: Path, steps: int, quick: bool) -> dict:
    """Share of the default experiment's training time spent in the train loader."""
    seconds = [0.0]
    real = TrainBatches.__getitem__

    def timed(self, batch):
        start = time.perf_counter()
        try:
            return real(self, batch)
        finally:
            seconds[0] += time.perf_counter() - start

    overrides = [f"trainer.max_steps={steps}", "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
                 "optim.warmup_steps=1", "run.sample_tokens=0", f"run.output_dir={work}/runs",
                 f"data.cache_dir={work}/cache-default"]
    if quick:
        overrides += ["model=tiny", "data.max_chars=200000"]
    warm = load_config(REPO / "experiments/default.yaml", [*overrides, "trainer.max_steps=2", "run.name=warm"])
    log("loading: preparing the default experiment's store")
    train(warm)
    TrainBatches.__getitem__ = timed
    try:
        log(f"loading: {steps} training steps of the default experiment")
        metrics = train(load_config(REPO / "experiments/default.yaml", [*overrides, "run.name=timed"]))["metrics"]
    finally:
        TrainBatches.__getitem__ = real
    return {"steps": steps, "loader_s": seconds[0], "train_time_s": metrics["train_time_s"],
            "share": seconds[0] / metrics["train_time_s"], "tokens_per_s": metrics["tokens_per_sec"]}


def bench_mixture(work: Path) -> dict:
    """Realized shares of three weighted sources over 10,000 windows per phase, and the switch step."""
    sources = {}
    for i, name in enumerate(("web", "code", "math")):
        path = work / f"mix-{name}.jsonl"
        rows = [json.dumps({"text": f"{name} document {j}: " + "lorem ipsum dolor " * (5 + (j * 7 + i) % 40)})
                for j in range(300)]
        path.write_text("\n".join(rows) + "\n")
        sources[name] = SourceConfig(kind="files", data_files=[str(path)], weight=[0.5, 0.3, 0.2][i])
    switch, batch_size = 1250, 8
    cfg = DataConfig(sources=sources, phases=[PhaseConfig(start=switch, weights={"web": 0.2, "code": 0.2,
                                                                                 "math": 0.6})],
                     seq_len=64, batch_size=batch_size, cache_dir=str(work / "cache-mix"))
    dm = JetMoeDataModule(cfg, vocab_size=512, phase_steps=[switch])
    dm.setup()
    loader = dm.train_dataloader()
    rows = [loader.dataset.window_ids(b)[0] for b in range(2 * switch)]  # the sources of the rows handed out
    per_batch = np.stack(rows)
    weights = (np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6]))
    result = {"windows_per_phase": switch * batch_size, "switch_step": switch}
    for phase, part in enumerate((per_batch[:switch], per_batch[switch:])):
        counts = np.bincount(part.ravel(), minlength=3)
        result[f"phase{phase + 1}_shares"] = dict(zip(dm.source_names, (counts / part.size).round(6).tolist()))
        result[f"phase{phase + 1}_max_error"] = float(np.abs(counts / part.size - weights[phase]).max())
        result[f"phase{phase + 1}_max_error_windows"] = float(np.abs(counts - weights[phase] * part.size).max())
    return result


def markdown(results: dict) -> str:
    t, r, l, m = (results.get(k) for k in ("throughput", "rss", "loading", "mixture"))
    lines = [f"# Data pipeline benchmark ({results['machine']})", "", f"Command: `{results['command']}`", "",
             "| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    if t:
        lines.append(f"| prepare throughput / in-memory `encode_batch_fast` ({t['chars'] / 1e6:.0f}M chars) | "
                     f"{t['prepare_tokens_per_s'] / 1e6:.2f}M / {max(t['ceiling_fast_tokens_per_s']) / 1e6:.2f}M "
                     f"tokens/s = **{t['ratio']:.2f}x** (cpu/wall {t['prepare_cpu_per_wall']:.2f}; `encode_batch` "
                     f"{t['ceiling_encode_batch_tokens_per_s'] / 1e6:.2f}M) | >= 0.8x | "
                     f"{'yes' if t['ratio'] >= TARGETS['throughput'] else 'no'} |")
    if r:
        small, large = r[0], r[-1]
        ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
        ok = ratio <= TARGETS["rss_ratio"] and large["peak_rss_bytes"] < TARGETS["rss_bytes"]
        sizes = " / ".join(f"{x['peak_rss_bytes'] / 2**20:,.0f} MiB ({x['chars'] / 1e6:,.0f}M chars, {x['wall_s']:.0f}s)"
                           for x in r)
        lines.append(f"| peak RSS of `jetmoe prepare` | {sizes}: **{ratio:.2f}x** | <= 1.2x, < 1.5 GB | "
                     f"{'yes' if ok else 'no'} |")
    if l:
        lines.append(f"| data loading share of the default experiment's step ({l['steps']} steps) | "
                     f"{l['loader_s']:.2f}s of {l['train_time_s']:.1f}s = **{l['share']:.2%}** | <= 2 % | "
                     f"{'yes' if l['share'] <= TARGETS['loading_share'] else 'no'} |")
    if m:
        worst = max(m["phase1_max_error"], m["phase2_max_error"])
        windows = max(m["phase1_max_error_windows"], m["phase2_max_error_windows"])
        lines.append(f"| mixture shares over {m['windows_per_phase']:,} windows per phase (switch at step "
                     f"{m['switch_step']:,}) | phase 1 {m['phase1_shares']}, phase 2 {m['phase2_shares']}: max error "
                     f"**{worst:.4%}** ({windows:.1f} windows off within a phase) | +-1 %, exact at the switch | "
                     f"{'yes' if worst <= TARGETS['share_error'] and windows <= 1 else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few MB and a tiny model (smoke run)")
    p.add_argument("--throughput-mb", type=float, default=None, help="corpus for the throughput row (default 100)")
    p.add_argument("--rss-mb", type=float, nargs="+", default=None, help="corpora for the memory row (100 1000)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the loading row (default 150)")
    p.add_argument("--only", nargs="+", choices=("throughput", "rss", "loading", "mixture"), default=None)
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    args = p.parse_args(argv)
    throughput_mb = args.throughput_mb or (2 if args.quick else 100)
    rss_mb = args.rss_mb or ([1, 4] if args.quick else [100, 1000])
    steps = args.steps or (4 if args.quick else 150)
    only = set(args.only or ("throughput", "rss", "loading", "mixture"))

    results: dict = {"machine": machine_name(torch.device("cpu")), "command": " ".join(["python", *sys.argv])}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every figure: a run stopped early keeps what it measured
        (args.out_dir / "data.json").write_text(json.dumps(results, indent=2) + "\n")
        text = markdown(results)
        (args.out_dir / "data.md").write_text(text)
        return text

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        tokenizer_path = work / "tokenizer.json"
        files = stdlib_files()[: 60 if args.quick else None]
        train_tokenizer([read_lenient(f) for f in files], 4096, SpecialTokens()).save(str(tokenizer_path))
        if "mixture" in only:
            results["mixture"] = bench_mixture(work)
            save()
        if "loading" in only:
            results["loading"] = bench_loading(work, steps, args.quick)
            save()
        if "throughput" in only:
            results["throughput"] = bench_throughput(work, throughput_mb, tokenizer_path)
            save()
        if "rss" in only:
            results["rss"] = []
            for mb in sorted(rss_mb):
                results["rss"].append(prepare_rss(work, mb, tokenizer_path))
                save()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
