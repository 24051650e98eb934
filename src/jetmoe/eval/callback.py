"""Downstream evaluation during training (OLMo-core's in-loop evaluators): multiple-choice tasks scored every N
optimizer steps, logged to TensorBoard as ``downstream/<task>/acc`` and ``downstream/<task>/acc_norm``.

Tasks are read when the callback is built, so a missing or malformed task file stops ``jetmoe train`` before any
training. Each evaluation scores every item with the training model in eval mode under the trainer's precision
(``jetmoe.eval.scoring``: the numbers lm-evaluation-harness gives for the same items), items split across ranks
(every rank runs the same number of forward passes, as FSDP needs), counts summed over ranks.
Steps are optimizer steps: step 0 is the initial weights, step N the weights after N updates.
The history of every evaluation is written to ``<output_dir>/downstream.json`` and kept in checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from tokenizers import Tokenizer

from jetmoe.eval.config import DownstreamConfig
from jetmoe.eval.scoring import Request, build_requests, correct_counts, loglikelihoods
from jetmoe.eval.tasks import MultipleChoiceTask, load_task, task_summary
from jetmoe.files import atomic_write_json

DOWNSTREAM_JSON = "downstream.json"
log = logging.getLogger("jetmoe.train")


def build_downstream_callback(cfg: DownstreamConfig, output_dir: str | os.PathLike) -> DownstreamEvalCallback | None:
    """The callback an experiment's ``downstream:`` section asks for (None when off or without tasks)."""
    if cfg.every_n_steps == 0 or not cfg.tasks:
        return None
    tasks = [load_task(task) for task in cfg.tasks]
    return DownstreamEvalCallback(tasks, cfg.every_n_steps, batch_size=cfg.batch_size, at_start=cfg.at_start,
                                  output_dir=output_dir)


class DownstreamEvalCallback(L.Callback):
    """Scores ``tasks`` at step 0 (``at_start``), every ``every_n_steps`` optimizer steps and at ``max_steps``.

    The tokenizer is ``tokenizer``, else the datamodule's ``tokenizer`` attribute (set by its ``setup``). The
    model is ``pl_module.model`` (a JetMoeForCausalLM, possibly FSDP-sharded); its config gives the EOS id
    (the prefix of empty contexts), the pad id and the maximum length.
    """

    def __init__(
        self,
        tasks: Sequence[MultipleChoiceTask],
        every_n_steps: int,
        *,
        batch_size: int = 32,
        at_start: bool = True,
        tokenizer: Tokenizer | None = None,
        output_dir: str | os.PathLike | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.tasks = list(tasks)
        self.every_n_steps, self.batch_size, self.at_start = every_n_steps, batch_size, at_start
        self.tokenizer, self.output_dir = tokenizer, output_dir
        self.history: list[dict[str, Any]] = []  # one entry per evaluation: step, seconds, per-task results
        self._requests: dict[str, list[Request]] = {}
        self._last_step = -1

    # ---- hooks ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Encode the tasks (the datamodule's tokenizer and the model exist from here on), score step 0."""
        if not self._requests:
            tokenizer = self.tokenizer or getattr(trainer.datamodule, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("DownstreamEvalCallback needs a tokenizer: pass one, or use a datamodule with .tokenizer")
            eos = pl_module.model.config.eos_token_ids[0]

            def encode(text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False).ids

            self._requests = {task.name: build_requests(task, encode, eos) for task in self.tasks}
            if trainer.is_global_zero:
                log.info(f"downstream evaluation every {self.every_n_steps} steps: {task_summary(self.tasks)}")
        self._last_step = trainer.global_step
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or (step % self.every_n_steps and step != trainer.max_steps):
            return
        self._last_step = step
        self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        """Score every task now (every rank must call this); log, record and return ``{task: {acc, acc_norm}}``."""
        start = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with trainer.precision_plugin.forward_context():
                results = {task.name: self._score(trainer, pl_module, task) for task in self.tasks}
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        step = trainer.global_step
        self.history = [entry for entry in self.history if entry["step"] < step]  # a resumed run repeats no step
        self.history.append({"step": step, "seconds": round(seconds, 3), "tasks": results})
        metrics = {f"downstream/{name}/{key}": value for name, result in results.items()
                   for key, value in result.items() if key in ("acc", "acc_norm")}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._write()
            summary = " | ".join(f"{name} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f}" for name, r in results.items())
            log.info(f"step {step}/{trainer.max_steps} | downstream {summary} | {seconds:.1f}s")
        return results

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, task: MultipleChoiceTask) -> dict[str, float]:
        """This rank's items (every world_size-th), padded to the same number of batches on every rank."""
        rank, world = trainer.global_rank, trainer.world_size
        requests = self._requests[task.name]
        mine = [r for r in requests if r.item % world == rank]
        most = max(sum(1 for r in requests if r.item % world == other) for other in range(world))
        padded = mine + [mine[0] if mine else requests[0]] * (most - len(mine))  # repeats, not counted
        config = pl_module.model.config
        lls = loglikelihoods(pl_module.model, padded, batch_size=self.batch_size,
                             max_length=config.max_position_embeddings, pad_token_id=config.eos_token_ids[0],
                             device=pl_module.device)
        counts = torch.tensor(correct_counts(task, mine, lls[: len(mine)]), dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        acc, acc_norm = (float(c) / len(task.items) for c in counts)
        return {"acc": acc, "acc_norm": acc_norm, "items": len(task.items), "chance": round(task.chance, 6)}

    def _write(self) -> None:
        if self.output_dir is None:
            return
        path = Path(self.output_dir) / DOWNSTREAM_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "tasks": {task.name: {"items": len(task.items), "chance": task.chance, "source": task.source}
                      for task in self.tasks},
            "history": self.history,
        }
        atomic_write_json(path, report)

