"""AdamW parameter groups and learning-rate schedules (pure functions, no Lightning).

Schedules are multiplicative factors of the peak lr for ``torch.optim.lr_scheduler.LambdaLR``,
stepped once per optimizer step; ``factor(step)`` is the lr used by optimizer step ``step``
(0-based), so the final step ``max_steps - 1`` runs at ``min_lr_ratio`` for wsd and cosine.

* ``wsd`` (warmup-stable-decay, the JetMoE / MiniCPM recipe): linear warmup over ``warmup_steps``,
  constant peak, then over the last ``decay_fraction * max_steps`` steps a **1-sqrt** decay to
  ``min_lr_ratio``: ``min + (1 - min) * (1 - sqrt(progress))``. 1-sqrt keeps the lr high for
  longer than a linear ramp and ends lower losses at equal cost (Hägele et al., 2024).
* ``cosine``: linear warmup, then a half cosine from peak to ``min_lr_ratio`` at the last step.
* ``constant``: linear warmup, then peak.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from jetmoe.training.config import OptimConfig, TrainerConfig, wsd_decay_start


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_embeddings: bool = False,
    decay_norms_and_biases: bool = False,
) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed AdamW group.

    Matrices and 3-D expert weights decay; 1-D parameters (norm gains, biases) and embedding
    tables (including an lm_head tied to them) do not, unless the flags say so. Empty groups are
    dropped.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates tied weights
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            wants_decay = decay_embeddings
        elif p.ndim < 2:
            wants_decay = decay_norms_and_biases
        else:
            wants_decay = True
        (decay if wants_decay else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(
    schedule: str,
    *,
    max_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.1,
    min_lr_ratio: float = 0.1,
) -> Callable[[int], float]:
    """The lr factor at each optimizer step for ``schedule`` (see module docstring)."""

    def warmup(step: int) -> float:
        return (step + 1) / warmup_steps

    def wsd(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        decay_steps = round(decay_fraction * max_steps)
        into_decay = step - wsd_decay_start(max_steps, decay_fraction) + 1
        if decay_steps == 0 or into_decay <= 0:
            return 1.0
        progress = min(1.0, into_decay / decay_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - math.sqrt(progress))

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - warmup_steps + 1) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        return warmup(step) if step < warmup_steps else 1.0

    schedules = {"wsd": wsd, "cosine": cosine, "constant": constant}
    if schedule not in schedules:
        raise ValueError(f"unknown lr schedule {schedule!r} (choose from {', '.join(schedules)})")
    return schedules[schedule]


def build_optimizer(
    model: nn.Module, optim: OptimConfig, trainer: TrainerConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-step LambdaLR schedule."""
    groups = param_groups(
        model,
        optim.weight_decay,
        decay_embeddings=optim.decay_embeddings,
        decay_norms_and_biases=optim.decay_norms_and_biases,
    )
    on_cuda = groups[0]["params"][0].is_cuda
    optimizer = torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        **({"fused": True} if on_cuda else {"foreach": True}),
    )
    factor = lr_lambda(
        optim.schedule,
        max_steps=trainer.max_steps,
        warmup_steps=optim.warmup_steps,
        decay_fraction=optim.decay_fraction,
        min_lr_ratio=optim.min_lr_ratio,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
