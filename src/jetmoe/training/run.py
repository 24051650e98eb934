"""Training runs end to end, and generation / evaluation from a finished run.

A run directory ``<run.output_dir>/<run.name>/`` holds::

    config.yaml                 the resolved experiment config
    checkpoints/last.ckpt       Lightning checkpoint of the last step (``--resume`` continues from it)
    checkpoints/best-*.ckpt     lowest val/loss so far
    tb/                         TensorBoard event files
    expert_utilization.{json,csv}   routing statistics (``jetmoe report``)
    downstream.json             downstream accuracy at every evaluation (``downstream:`` section)
    figures/                    loss, downstream and routing figures (PNG; ``jetmoe report`` redraws them)
    hf/                         weights, config, tokenizer files, generation config, model card (``jetmoe.hf_export``)
    metrics.json                final losses, throughput, parameter counts
    eval/                       ``jetmoe eval`` results (lm-evaluation-harness, perplexity)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tokenizers import Tokenizer

from jetmoe import JetMoeConfig, JetMoeForCausalLM, hf_io, load_pretrained, save_pretrained
from jetmoe.data.config import SourceConfig
from jetmoe.errors import ConfigError, MissingFileError, UserError, divisor_problem
from jetmoe.files import atomic_write_json, atomic_write_text
from jetmoe.data.datamodule import JetMoeDataModule, evaluation_batches
from jetmoe.data.prepare import SourceSummary, prepare_store
from jetmoe.data.sources import read_files, resolve_files
from jetmoe.data.tokenizer import SpecialTokens, read_tokenizer
from jetmoe.training.callbacks import MixtureLog, ProgressLog, ValidateOnLastStep
from jetmoe.training.config import (
    HF_EXPORT, RUN_CONFIG, TRAINING_FIELDS, ExperimentConfig, build_model_config, data_phase_steps, load_run_config,
    model_dir_of, to_yaml,
)
from jetmoe.training.expert_callback import ExpertUtilizationCallback
from jetmoe.training.host_memory import retain_freed_memory
from jetmoe.distributed import save_hf
from jetmoe.errors import MissingFileError, UserError
from jetmoe.eval.callback import build_downstream_callback
from jetmoe.eval.harness import run_lm_eval
from jetmoe.distributed.strategy import FSDP2Strategy
from jetmoe.training.module import JetMoeLitModule
from jetmoe.training.reliability import AtomicCheckpointIO, NonFiniteGuard, resumable_checkpoint
from jetmoe.training.report import EVAL_DIR, LM_EVAL_KIND, complete_export

CHECKPOINTS, TENSORBOARD = "checkpoints", "tb"
LAST_CKPT = "last.ckpt"
TOKENIZER_FILE = "tokenizer.json"


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


# ----------------------------------------------------------------------------- training


def train(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (or continue its run from ``checkpoints/last.ckpt``), export ``hf/``, write
    ``metrics.json`` and generate a sample. Returns a summary dict (paths, metrics, sample)."""
    run_dir = run_dir_of(cfg)
    last_ckpt = run_dir / CHECKPOINTS / LAST_CKPT
    trainer = _build_trainer(cfg, run_dir)  # first: rejects unsupported settings before anything is written
    if cfg.trainer.retain_host_memory:
        retain_freed_memory()
    _prepare_run_dir(run_dir, last_ckpt, resume, cfg)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)

    m = cfg.model
    data = JetMoeDataModule(
        cfg.data,
        vocab_size=m.vocab_size,
        bos_token_id=m.bos_token_id,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.pad_token_id,
        seed=cfg.run.seed,
        phase_steps=data_phase_steps(cfg),
    )
    module = JetMoeLitModule(cfg)

    start = time.perf_counter()
    ckpt_path = resumable_checkpoint(run_dir / CHECKPOINTS, LAST_CKPT) if resume else None
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    wall_time = time.perf_counter() - start

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoints": str(run_dir / CHECKPOINTS),
        "tensorboard": str(run_dir / TENSORBOARD),
        "hf_dir": str(run_dir / HF_EXPORT),
    }
    sharded = isinstance(trainer.strategy, FSDP2Strategy)
    if sharded:  # a collective: every rank contributes its shards to rank 0's full copy
        save_hf(module.model, run_dir / HF_EXPORT)
    if not trainer.is_global_zero:
        return summary
    metrics = _final_metrics(trainer, module, wall_time)
    metrics["data_mix"] = data.mixture.summary(data.train_loader.batches)  # realized shares, whole run and phases
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    export(None if sharded else module.model, data.tokenizer_path, run_dir / HF_EXPORT, build_model_config(m), run_dir)
    summary["metrics"] = metrics
    if cfg.run.sample_tokens:
        model = load_run_model(run_dir)[0] if sharded else module.model  # sharded weights: use the export
        summary["sample"] = sample(model, data.tokenizer, cfg.run.sample_prompt, cfg.run.sample_tokens, seed=cfg.run.seed)
    return summary


def prepare(cfg: ExperimentConfig, sources: Sequence[str] = ()) -> list[SourceSummary]:
    """Tokenize every source of ``cfg`` (or only ``sources``) into its token store (``jetmoe prepare``); missing
    or damaged shards are rebuilt, finished ones kept."""
    m = cfg.model
    special = SpecialTokens(pad_token_id=m.pad_token_id, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id)
    return prepare_store(cfg.data, vocab_size=m.vocab_size, special=special, only=sources or None)


def _prepare_run_dir(run_dir: Path, last_ckpt: Path, resume: bool, cfg: ExperimentConfig) -> None:
    if resume and not any(last_ckpt.parent.glob("*.ckpt")):
        raise MissingFileError(f"--resume: no checkpoint in {last_ckpt.parent}")
    if not resume and last_ckpt.exists():
        raise UserError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another run.name / run.output_dir"
        )
    if resume and (run_dir / RUN_CONFIG).is_file():
        _check_same_architecture(load_run_config(run_dir), cfg, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_CONFIG, to_yaml(cfg))
    except OSError as err:
        raise UserError(f"cannot write the run directory {run_dir}: {err.strerror or err}") from None


def _check_same_architecture(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path) -> None:
    """--resume continues the checkpoint's weights: every model field but the training ones must be the same."""
    for key in dataclasses.asdict(cfg.model):
        if key not in TRAINING_FIELDS and getattr(saved.model, key) != getattr(cfg.model, key):
            raise ConfigError(
                f"--resume: model.{key} is {getattr(cfg.model, key)!r}, but the run in {run_dir} was trained with "
                f"{getattr(saved.model, key)!r} (its checkpoints have that architecture)"
            )


def _build_trainer(cfg: ExperimentConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    fsdp = t.strategy == "fsdp"
    m = cfg.model
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINTS,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            save_last=True,
        ),
        ValidateOnLastStep(),
        NonFiniteGuard(cfg.optim.on_nonfinite),
        ProgressLog(t.log_every_n_steps),  # plain lines instead of a redrawn bar: same in a terminal and a log file
        MixtureLog(t.log_every_n_steps * t.accumulate_grad_batches),  # data/mix/<source> in TensorBoard
    ]
    downstream = build_downstream_callback(cfg.downstream, run_dir)  # reads the task files: bad ones stop here
    if downstream is not None:
        callbacks.append(downstream)
    if cfg.run.expert_metrics:
        callbacks.append(
            ExpertUtilizationCallback(
                num_layers=m.num_hidden_layers,
                num_experts=m.num_local_experts,
                top_k=m.num_experts_per_tok,
                log_every_n_steps=cfg.run.expert_log_every_n_steps,
                heatmap_every_n_steps=cfg.run.heatmap_every_n_steps,
                output_dir=run_dir,
            )
        )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=FSDP2Strategy(expert_parallel=t.expert_parallel) if fsdp else t.strategy,
        precision="32-true" if fsdp else t.precision,  # under FSDP the precision is FSDP2's mixed-precision policy
        max_steps=t.max_steps,
        max_epochs=-1,
        check_val_every_n_epoch=None,  # validate every val_check_interval batches, across epochs
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        logger=TensorBoardLogger(run_dir, name=TENSORBOARD, version="", default_hp_metric=False),
        callbacks=callbacks,
        enable_progress_bar=False,
        default_root_dir=run_dir,
        use_distributed_sampler=False,  # the data module shards by rank itself
        plugins=[] if fsdp else [AtomicCheckpointIO()],  # write-then-rename, loaded with weights_only=True
    )
    problem = divisor_problem("trainer.expert_parallel", t.expert_parallel,
                              "the number of ranks, trainer.devices × trainer.num_nodes", trainer.world_size)
    if problem:  # before any process is launched
        raise ConfigError(problem)
    return trainer


def _final_metrics(trainer: L.Trainer, module: JetMoeLitModule, wall_time: float) -> dict[str, Any]:
    def metric(name: str) -> float | None:
        value = trainer.callback_metrics.get(name)
        return None if value is None else float(value)

    params = build_model_config(module.cfg.model).num_parameters()
    return {
        "step": trainer.global_step,
        "train_loss": metric("train/loss"),
        "val_loss": metric("val/loss"),
        "val_ppl": metric("val/ppl"),
        "tokens_seen": module.tokens_seen,
        "wall_time_s": round(wall_time, 2),  # the whole fit: data preparation, training, validation
        "train_time_s": round(module.fit_seconds, 2),
        "tokens_per_sec": round(module.fit_tokens / module.fit_seconds, 1) if module.fit_seconds > 0 else None,
        "params_total": params["total"],
        "params_active": params["active"],
    }


def export(
    model: JetMoeForCausalLM | None, tokenizer_path: str | Path, hf_dir: Path, config: JetMoeConfig, run_dir: Path
) -> None:
    """Write the HF-format model (config.json, model.safetensors; skipped for None, already exported by
    `jetmoe.distributed.save_hf` under FSDP), then what makes it a complete HF directory: tokenizer files,
    generation config, the run's figures and model card (`jetmoe.training.report.complete_export`)."""
    if model is not None:
        save_pretrained(model, hf_dir)
    complete_export(run_dir, hf_dir, config, tokenizer_path)


# ----------------------------------------------------------------------------- generation / evaluation


def load_run_model(path: str | Path) -> tuple[JetMoeForCausalLM, Tokenizer]:
    """Model and tokenizer from a run directory (its ``hf/``) or an HF model directory."""
    hf_dir = model_dir_of(path)
    if not (hf_dir / TOKENIZER_FILE).is_file():
        raise MissingFileError(f"{hf_dir} has no {TOKENIZER_FILE}")
    model = load_pretrained(hf_dir)
    return model.eval(), read_tokenizer(hf_dir / TOKENIZER_FILE)


@torch.no_grad()
def sample(
    model: JetMoeForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    do_sample: bool = True,
    seed: int = 0,
    compile: bool = False,
) -> str:
    """``prompt`` followed by up to ``max_new_tokens`` generated tokens (stops at EOS), as text. ``compile``: a
    static KV cache and a compiled decode step (see `jetmoe.model.generation.generate`)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [model.config.eos_token_ids[0]]
    room = model.config.max_position_embeddings - len(ids)
    if room <= 0:
        raise UserError(
            f"--prompt is {len(ids)} tokens; the model's max_position_embeddings is {model.config.max_position_embeddings}"
        )
    was_training = model.training
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=model.device),
        max_new_tokens=min(max_new_tokens, room),
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator(model.device).manual_seed(seed),
        static_cache=compile,
        compile=compile,
    )
    model.train(was_training)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def generate(path: str | Path, prompt: str, max_new_tokens: int = 200, **sampling: Any) -> str:
    """Generate text from a run directory or an HF model directory; ``sampling`` as in :func:`sample`."""
    model, tokenizer = load_run_model(path)
    return sample(model, tokenizer, prompt, max_new_tokens, **sampling)


@torch.no_grad()
def evaluate(
    path: str | Path, files: Sequence[str], seq_len: int | None = None, batch_size: int = 8
) -> dict[str, float]:
    """Token-level cross-entropy and perplexity of a model on text files.

    Each file is tokenized with the model's tokenizer (EOS after each document, as in training) and
    cut into windows of ``seq_len`` tokens (default: the run's ``data.seq_len``, else the model's
    ``max_position_embeddings``); every token but a window's first is scored once.
    """
    model, tokenizer = load_run_model(path)
    seq_len = seq_len or _training_seq_len(Path(path)) or model.config.max_position_embeddings
    if not 2 <= seq_len <= model.config.max_position_embeddings:
        raise UserError(f"--seq-len must be in [2, {model.config.max_position_embeddings}], got {seq_len}")
    missing = [f for f in files if not glob.has_magic(f) and not Path(f).expanduser().exists()]
    if missing:
        raise MissingFileError(f"file not found: {missing[0]}")
    src = SourceConfig()
    docs = read_files(resolve_files(files), src.text_field, src.text_split)
    batches = evaluation_batches(tokenizer, docs, seq_len=seq_len, batch_size=batch_size,
                                 eos_token_id=model.config.eos_token_ids[0])
    total_ce, total_tokens = 0.0, 0
    for batch in batches:
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
        scored = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        total_ce += out.ce_loss.item() * scored
        total_tokens += scored
    loss = total_ce / total_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": total_tokens}


def _training_seq_len(path: Path) -> int | None:
    """``data.seq_len`` of a run directory's config, if ``path`` is one."""
    return load_run_config(path).data.seq_len if (path / RUN_CONFIG).is_file() else None


# ----------------------------------------------------------------------------- jetmoe eval results


def eval_output_dir(path: str | Path, output_dir: str | Path | None = None) -> Path | None:
    """Where ``jetmoe eval`` writes results: ``output_dir``, else ``RUN_DIR/eval`` for a run directory (None for a
    bare model directory: nothing is written into it)."""
    if output_dir is not None:
        return Path(output_dir)
    return Path(path) / EVAL_DIR if model_dir_of(path) != Path(path) else None


def write_eval_result(out_dir: Path, kind: str, result: dict[str, Any]) -> Path:
    """``<out_dir>/<kind>-<UTC time>.json`` (never overwriting an earlier result)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = out_dir / f"{kind}-{stamp}.json", 1
    while path.exists():
        path, n = out_dir / f"{kind}-{stamp}-{n}.json", n + 1
    return atomic_write_json(path, result, default=str)


def evaluate_tasks(
    path: str | Path,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    output_dir: Path | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """lm-evaluation-harness ``tasks`` (:mod:`jetmoe.eval.harness`) on a run's export or an HF model directory.

    Returns lm-eval's results and the file they were written to (``lm_eval-<UTC time>.json`` in ``output_dir``,
    None without one). For a run directory the export's model card is rewritten to include them.
    """
    if not tasks:
        raise UserError("--tasks: name at least one task")
    hf_dir = model_dir_of(path)
    with tempfile.TemporaryDirectory(prefix="jetmoe-tasks-") as work:  # JSON-lines copies of local tasks
        results = run_lm_eval(hf_dir, tasks, work_dir=work, num_fewshot=num_fewshot, limit=limit,
                              batch_size=batch_size, device=device)
    written = None
    if output_dir is not None:
        kept = {k: v for k, v in results.items() if k != "samples"}
        written = write_eval_result(output_dir, LM_EVAL_KIND, {**kept, "limit": limit})  # the card marks partial runs
    if written is not None and written.parent.resolve() == (Path(path) / EVAL_DIR).resolve():  # a run's own results
        complete_export(path, hf_dir, hf_io.load_config(hf_dir), None)
    return results, written
