"""JetMoeLitModule: the LightningModule that trains a JetMoeForCausalLM on packed token batches."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from jetmoe import JetMoeForCausalLM, hf_io, load_pretrained
from jetmoe.errors import InputFileError
from jetmoe.model import packed_causal_mask
from jetmoe.model.upcycle import is_router_key, upcycle_state_dict
from jetmoe.training.config import (
    TRAINING_FIELDS, ExperimentConfig, build_model_config, from_dict, model_dir_of, to_dict,
)
from jetmoe.training.optim import build_optimizer

THROUGHPUT_WINDOW = 20  # micro-batches averaged into train/tokens_per_sec


def load_upcycled(
    model: JetMoeForCausalLM, source: str, noise: float = 0.0, generator: torch.Generator | None = None
) -> None:
    """Load into `model` every weight but its routers' from the dense model at `source` (a run directory or an HF
    directory), each expert a copy of the dense MLP or attention (`jetmoe.model.upcycle`)."""
    directory = model_dir_of(source)
    dense_state, dense_config = hf_io.load_state_dict(directory), hf_io.load_config(directory)
    state = upcycle_state_dict(dense_state, dense_config, model.config, noise, generator)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.config.tie_word_embeddings
    missing = [k for k in missing if not is_router_key(k) and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise InputFileError(
            f"{directory}: weights do not match its config.json: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}"
        )


class JetMoeLitModule(L.LightningModule):
    """Causal-LM training of JetMoE: loss = CE + aux_loss_coef * load balance + router_z_loss_coef * z-loss.

    ``training_step`` / ``validation_step`` return ``{"loss", "routings", "token_mask"}`` for
    :class:`jetmoe.training.expert_callback.ExpertUtilizationCallback`.
    """

    def __init__(self, cfg: ExperimentConfig | dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else from_dict(cfg)
        self.save_hyperparameters({"cfg": to_dict(self.cfg)})  # plain dict: a checkpoint knows its config
        self.model: JetMoeForCausalLM | None = None
        self.val_ce = MeanMetric()  # token-weighted mean CE over the validation set
        self.tokens_seen = 0  # global: all ranks, all micro-batches, persisted in checkpoints
        # this fit's training loop (validation included): wall seconds and tokens, set at its end
        self.fit_seconds, self.fit_tokens = 0.0, 0
        self._step_times: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_WINDOW)
        self._last_batch_end: float | None = None
        self._load_RE: torch.Tensor | None = None  # balancing="bias": routed rows per expert since the last step

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the model once (weights are initialised by its constructor, loaded from ``init_from``, or upcycled
        from ``upcycle_from``)."""
        if self.model is not None:
            return
        m, t = self.cfg.model, self.cfg.trainer
        if self.device_mesh is not None:  # FSDP2Strategy: meta build -> parallelize -> shard-wise init
            from jetmoe.distributed import build_sharded_causal_lm, load_hf_weights

            self.model = build_sharded_causal_lm(
                build_model_config(m), self.device_mesh, self.trainer.strategy.root_device,
                activation_checkpointing="full" if m.gradient_checkpointing else "none",
                compile=t.compile, precision=t.precision, expert_parallel_attention=t.expert_parallel_attention,
            )
            if m.init_from:
                load_hf_weights(self.model, m.init_from)
            return
        if m.init_from:
            overrides = {k: getattr(m, k) for k in TRAINING_FIELDS}
            model = load_pretrained(m.init_from, **overrides)
        else:
            model = JetMoeForCausalLM(build_model_config(m))
            if m.upcycle_from:  # the routers keep their seeded init; the noise has its own seeded generator
                load_upcycled(model, m.upcycle_from, m.upcycle_noise, torch.Generator().manual_seed(self.cfg.run.seed))
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.cfg.trainer.compile:
            model.compile()  # in place: state_dict keys stay unprefixed
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]):
        position_ids = batch["position_ids"]
        mask = packed_causal_mask(position_ids) if self.cfg.data.intra_doc_mask else None
        return self.model(
            batch["input_ids"],
            attention_mask=mask,
            position_ids=position_ids,
            labels=batch["labels"],
            use_cache=False,
            skip_logits=True,  # CE fused with the LM head (validation too): the [B, T, V] logits never exist
        )

    @staticmethod
    def _expert_outputs(loss: torch.Tensor, out) -> dict[str, Any]:
        return {"loss": loss, "routings": tuple(r.detach() for r in out.routings), "token_mask": None}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size  # equal packed shapes per rank
        self.loss_terms = {"train/loss": out.loss.detach(), "train/ce": out.ce_loss.detach(),
                           "train/aux": out.aux_loss.detach(), "train/z": out.z_loss.detach()}  # for NonFiniteGuard
        # sync_dist: the mean over ranks (a no-op on one process)
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log_dict({"train/ce": out.ce_loss, "train/aux": out.aux_loss, "train/z": out.z_loss}, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/tokens_seen", float(self.tokens_seen))
        if self.model.config.balancing == "bias":
            load_RE = torch.stack([routing.counts_E for routing in out.routings])
            self._load_RE = load_RE if self._load_RE is None else self._load_RE + load_RE
        return self._expert_outputs(out.loss, out)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then (balancing="bias") the routers' selection biases moved by the load of the
        step's micro-batches on all ranks, so that every rank keeps the same biases."""
        super().optimizer_step(*args, **kwargs)
        if self._load_RE is None:
            return
        load_RE, self._load_RE = self._load_RE, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_RE)
        for router, load_E in zip(self.model.routers(), load_RE):
            router.update_bias(load_E, self.model.config.bias_update_rate)

    def on_train_start(self) -> None:
        self._fit_start = (time.perf_counter(), self.tokens_seen)  # after a resumed checkpoint is loaded

    def on_train_end(self) -> None:
        start_time, start_tokens = self._fit_start
        self.fit_seconds, self.fit_tokens = time.perf_counter() - start_time, self.tokens_seen - start_tokens

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """tokens/s over the last micro-batches: wall time between batch ends (data loading included)."""
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self._step_times.append((batch["input_ids"].numel() * self.trainer.world_size, now - self._last_batch_end))
            tokens, seconds = map(sum, zip(*self._step_times))
            self.log("train/tokens_per_sec", tokens / seconds, prog_bar=True)
        self._last_batch_end = now

    def on_validation_end(self) -> None:
        self._last_batch_end = None  # don't count validation time as training time

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        n_targets = (batch["labels"][:, 1:] != -100).sum()
        self.val_ce.update(out.ce_loss.detach(), weight=n_targets)
        return self._expert_outputs(out.ce_loss, out)

    def on_validation_epoch_end(self) -> None:
        ce = self.val_ce.compute()  # synced across ranks
        self.val_ce.reset()
        self.log_dict({"val/loss": ce, "val/ppl": ce.exp()}, prog_bar=True, sync_dist=True)  # equal on all ranks

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(self.model, self.cfg.optim, self.cfg.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
