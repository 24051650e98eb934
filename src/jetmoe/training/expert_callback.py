"""Lightning callback that logs expert utilization, plus the end-of-run report (JSON, CSV, terminal table).

The LightningModule's ``training_step`` / ``validation_step`` must return
``{"loss": ..., "routings": the model's routings (detached), "token_mask": [N] bool | None}``;
batches without ``routings`` are skipped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor

from jetmoe import figures
from jetmoe.errors import MissingFileError, UserError
from jetmoe.files import atomic_write, atomic_write_json
from jetmoe.training.expert_metrics import ROUTER_KINDS, SUMMARY_KEYS, RouterUtilization, loads_by_kind, router_names

REPORT_JSON = "expert_utilization.json"
REPORT_CSV = "expert_utilization.csv"
LOGGED_KEYS = ("imbalance", "cv", "entropy_norm", "dead_fraction", "top1_top2_ratio", "balance_loss", "dropped_share")
EXPERT_KEYS = ("load", "prob", "top1_load", "tokens")
CSV_SUMMARY_KEYS = (
    "imbalance", "cv", "entropy_norm", "dead_fraction", "top1_top2_ratio", "balance_loss", "dropped_share"
)
BARS = "▁▂▃▄▅▆▇█"


class ExpertUtilizationCallback(L.Callback):
    """Logs per-router load statistics during training and validation and writes a report at the end.

    Keeps three ``RouterUtilization`` metrics: a train window (logged, folded into the run total and
    reset every ``log_every_n_steps`` optimizer steps), the whole-run train total, and validation
    (per epoch). Each batch is therefore routed through one metric update only.
    ``heatmap_every_n_steps`` (0 disables) adds figures to TensorBoard (the window's layer x expert load, MoA and
    MoE side by side, and each layer's load imbalance over the run so far) and per-router expert histograms, once
    per that many steps: at the first logged window that reaches a multiple of it. ``on_train_end`` writes
    ``expert_utilization.{json,csv}`` to ``output_dir`` (default: ``trainer.log_dir``); the JSON also holds every
    logged window's per-expert load (``history``), the source of ``jetmoe report``'s routing-over-time figures.
    All metric computes are collectives and run on every rank; only rank 0 writes.
    The run total is saved in checkpoints (summed over ranks), so after a resume the ``run`` scope still
    covers the whole run.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        log_every_n_steps: int = 50,
        heatmap_every_n_steps: int = 200,
        dead_threshold: float = 0.1,
        output_dir: str | os.PathLike | None = None,
    ):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if heatmap_every_n_steps < 0:
            raise ValueError(f"heatmap_every_n_steps must be >= 0 (0 disables), got {heatmap_every_n_steps}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.log_every_n_steps = log_every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.dead_threshold = dead_threshold
        self.output_dir = output_dir
        self.names = router_names(num_layers)
        self.window, self.total, self.val = (
            RouterUtilization(len(self.names), num_experts, top_k, dead_threshold) for _ in range(3)
        )
        self._device: torch.device | None = None
        self._last_logged_step = -1
        self._last_window: dict[str, Tensor] | None = None
        self._last_val: dict[str, Tensor] | None = None
        self.history: list[tuple[int, list[list[float]]]] = []  # (step, load [R][E]) of every logged window

    # ---- hooks ---------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # val_experts/* are already reduced by the metric's sync; mute Lightning's per-key sync_dist advice
        warnings.filterwarnings(
            "ignore", message=r"It is recommended to use `self.log\('val_experts/", category=PossibleUserWarning
        )
        every = trainer.log_every_n_steps
        if stage == "fit" and every and self.log_every_n_steps % every:
            raise ValueError(
                f"ExpertUtilizationCallback log_every_n_steps ({self.log_every_n_steps}) must be a multiple of "
                f"Trainer(log_every_n_steps={every}): Lightning writes step metrics only on its own log steps, so "
                "windows logged in between would be mislabelled or overwritten"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_logged_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(self.window, pl_module, outputs)
        step = trainer.global_step
        if self._device is None or step == self._last_logged_step or step % self.log_every_n_steps:
            return
        self._last_logged_step = step
        stats = self._flush_window(step)
        pl_module.log_dict(scalar_metrics("experts", stats), on_step=True, on_epoch=False, sync_dist=False)
        biases_RE = selection_biases(pl_module)
        if biases_RE is not None:
            pl_module.log_dict(bias_metrics("experts", biases_RE), on_step=True, on_epoch=False, sync_dist=False)
        if self._heatmap_due(step) and trainer.is_global_zero:
            self._log_images(trainer, stats, step)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(self.val, pl_module, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank sees the same number of validation batches, so update_called agrees across ranks
        if trainer.sanity_checking or not self.val.update_called:
            return
        self._last_val = compute_on_host(self.val)
        pl_module.log_dict(scalar_metrics("val_experts", self._last_val), sync_dist=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._device is None:
            return
        final_window = self._flush_window(trainer.global_step) if self.window.update_called else self._last_window
        scopes = {"window": final_window, "run": compute_on_host(self.total)}
        if self._last_val is not None:
            scopes["val"] = self._last_val
        output_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir is a collective
        if trainer.is_global_zero:
            write_report(output_dir, self._report(scopes, trainer.global_step, selection_biases(pl_module)))

    # ---- checkpoint state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run total so far (the open window included), summed over ranks: Lightning keeps rank 0's copy.

        Lightning builds the checkpoint on every rank, so the all-reduce here is matched on all of them (before
        the first batch the states are still on the CPU on every rank, and all zero: nothing to reduce).
        """
        sums = {name: total + getattr(self.window, name) for name, total in self.total.metric_state.items()}
        if self._device is not None and _distributed():
            for value in sums.values():
                torch.distributed.all_reduce(value)
        return {"run_total": {name: value.cpu() for name, value in sums.items()}, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the run total; it holds every rank's past tokens, so only global rank 0 takes it."""
        self.history = [(step, load) for step, load in state_dict.get("history", [])]
        sums = state_dict.get("run_total")
        rank = torch.distributed.get_rank() if _distributed() else 0
        if not sums or rank != 0:
            return
        self.total.reset()
        self.total.merge_state({name: value.to(getattr(self.total, name).device) for name, value in sums.items()})

    # ---- helpers -------------------------------------------------------------------------------------

    def _update(self, metric: RouterUtilization, pl_module: L.LightningModule, outputs) -> None:
        routings = outputs.get("routings") if isinstance(outputs, Mapping) else None
        if routings is None:
            return
        if self._device != pl_module.device:
            self._device = pl_module.device
            for each in (self.window, self.total, self.val):
                each.to(self._device)
        metric.update(routings, outputs.get("token_mask"))

    def _heatmap_due(self, step: int) -> bool:
        """True for the first logged window at or after each multiple of ``heatmap_every_n_steps``."""
        every = self.heatmap_every_n_steps
        return every > 0 and step % every < min(every, self.log_every_n_steps)

    def _flush_window(self, step: int) -> dict[str, Tensor]:
        """Compute the window (a collective), record its load, fold it into the run total and reset it."""
        self._last_window = compute_on_host(self.window)
        self.history = [entry for entry in self.history if entry[0] < step]  # a resumed run repeats no step
        self.history.append((step, self._last_window["load"].tolist()))
        self.total.merge_state(self.window)
        self.window.reset()
        return self._last_window

    def _log_images(self, trainer: L.Trainer, stats: dict[str, Tensor], step: int) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_image("experts/load_heatmap", load_heatmap(stats["load"], step), step, dataformats="HWC")
            if len(self.history) > 1:
                writer.add_image("experts/imbalance_over_time", imbalance_image(self.history), step, dataformats="HWC")
            for name, tokens_E in zip(self.names, stats["tokens"]):
                writer.add_histogram_raw(f"experts/{name}/expert_tokens", global_step=step, **expert_histogram(tokens_E))

    def _report(self, scopes: dict[str, dict[str, Tensor]], global_step: int, biases_RE: Tensor | None) -> dict:
        scopes_py = {scope: {key: value.tolist() for key, value in stats.items()} for scope, stats in scopes.items()}
        routers = []
        for r, name in enumerate(self.names):
            kind, layer = name.split("/layer_")
            entry = {"name": name, "kind": kind, "layer": int(layer)}
            for scope, stats in scopes_py.items():
                entry[scope] = {key: stats[key][r] for key in (*SUMMARY_KEYS, "num_tokens", *EXPERT_KEYS)}
            if biases_RE is not None:
                entry["expert_bias"] = biases_RE[r].tolist()
            routers.append(entry)
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "dead_threshold": self.dead_threshold,
            "global_step": global_step,
            "scopes": list(scopes),
            "routers": routers,
            "history": {"step": [step for step, _ in self.history], "load": [load for _, load in self.history]},
        }


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---- logging helpers ---------------------------------------------------------------------------------


def compute_on_host(metric: RouterUtilization) -> dict[str, Tensor]:
    """``metric.compute()`` (a collective) copied to CPU once, so logging costs no per-scalar device syncs."""
    return {key: value.cpu() for key, value in metric.compute().items()}


def scalar_metrics(prefix: str, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-router scalars ``<prefix>/<kind>/layer_<i>/<key>`` and per-kind summaries ``<prefix>/<kind>/...``."""
    names = router_names(len(stats["imbalance"]) // 2)
    scalars = {f"{prefix}/{name}/{key}": stats[key][r] for key in LOGGED_KEYS for r, name in enumerate(names)}
    for kind_idx, kind in enumerate(ROUTER_KINDS):
        imbalance_L = stats["imbalance"][kind_idx::2]
        scalars[f"{prefix}/{kind}/mean_imbalance"] = imbalance_L.mean()
        scalars[f"{prefix}/{kind}/max_imbalance"] = imbalance_L.max()
        scalars[f"{prefix}/{kind}/mean_entropy_norm"] = stats["entropy_norm"][kind_idx::2].mean()
        scalars[f"{prefix}/{kind}/dead_fraction"] = stats["dead_fraction"][kind_idx::2].mean()
    return scalars


def selection_biases(pl_module: L.LightningModule) -> Tensor | None:
    """``[R, E]`` the routers' selection biases on the host (``balancing="bias"``), in ``router_names`` order; None
    for a model without them."""
    model = getattr(pl_module, "model", None)
    biases = [router.expert_bias for router in model.routers()] if hasattr(model, "routers") else [None]
    return None if biases[0] is None else torch.stack(biases).detach().float().cpu()


def bias_metrics(prefix: str, biases_RE: Tensor) -> dict[str, Tensor]:
    """``<prefix>/<kind>/layer_<i>/bias/expert_<e>`` for every selection bias, and per kind the mean spread
    (max - min over a router's experts) ``<prefix>/<kind>/mean_bias_spread``."""
    names = router_names(len(biases_RE) // 2)
    scalars = {f"{prefix}/{name}/bias/expert_{e}": bias for name, bias_E in zip(names, biases_RE)
               for e, bias in enumerate(bias_E)}
    spread_R = biases_RE.amax(-1) - biases_RE.amin(-1)
    for kind_idx, kind in enumerate(ROUTER_KINDS):
        scalars[f"{prefix}/{kind}/mean_bias_spread"] = spread_R[kind_idx::2].mean()
    return scalars


def load_heatmap(load_RE: Tensor, step: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 image of a window's layer x expert load, MoA and MoE side by side (``figures``)."""
    return figures.figure_to_rgb(figures.expert_load_figure(loads_by_kind(load_RE.numpy()), f"expert load, step {step}"))


def imbalance_image(history: Sequence[tuple[int, list[list[float]]]]) -> np.ndarray:
    """``[H, W, 3]`` uint8 image of every layer's load imbalance over the logged windows so far."""
    steps = [step for step, _ in history]
    loads = loads_by_kind(np.array([load for _, load in history]))
    return figures.figure_to_rgb(figures.imbalance_over_time_figure(steps, loads))


def expert_histogram(tokens_E: Tensor) -> dict:
    """``add_histogram_raw`` arguments: one bucket per expert id, height = tokens routed to it."""
    counts_E = tokens_E.double()
    ids_E = torch.arange(len(counts_E), dtype=torch.float64)
    return {
        "min": 0,
        "max": len(counts_E) - 1,
        "num": int(counts_E.sum()),
        "sum": float(ids_E @ counts_E),
        "sum_squares": float(ids_E.square() @ counts_E),
        "bucket_limits": (ids_E + 0.5).tolist(),
        "bucket_counts": counts_E.tolist(),
    }


# ---- report files ------------------------------------------------------------------------------------


def write_report(output_dir: str | os.PathLike, report: dict) -> Path:
    """Write ``expert_utilization.json`` and the tidy ``expert_utilization.csv`` (one row per scope x router x expert),
    each crash-safe (``jetmoe.files``): a run killed while writing keeps the previous report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["scope", "kind", "layer", "expert", *EXPERT_KEYS, *CSV_SUMMARY_KEYS])
            for scope in report["scopes"]:
                for router in report["routers"]:
                    stats = router[scope]
                    summary = [stats[key] for key in CSV_SUMMARY_KEYS]
                    for expert in range(report["num_experts"]):
                        per_expert = [stats[key][expert] for key in EXPERT_KEYS]
                        writer.writerow([scope, router["kind"], router["layer"], expert, *per_expert, *summary])

    atomic_write(output_dir / REPORT_CSV, write_csv)
    return atomic_write_json(output_dir / REPORT_JSON, report)


def find_report(run_dir: str | os.PathLike) -> Path:
    """The report JSON: ``run_dir`` itself, ``run_dir/expert_utilization.json``, or the newest one below it."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if (run_dir / REPORT_JSON).is_file():
        return run_dir / REPORT_JSON
    found = sorted(run_dir.rglob(REPORT_JSON), key=lambda path: path.stat().st_mtime)
    if not found:
        raise MissingFileError(f"no {REPORT_JSON} in {run_dir} (expected a run directory written by jetmoe train)")
    return found[-1]


def load_bar(load_E: Sequence[float]) -> str:
    """One block character per expert, height relative to the largest load; a space for an expert with no tokens."""
    top = max(load_E) or 1.0
    return "".join(" " if load == 0 else BARS[max(0, math.ceil(load / top * len(BARS)) - 1)] for load in load_E)


def format_report(
    run_dir: str | os.PathLike, final_losses: Mapping[str, float] | None = None, scope: str = "run"
) -> str:
    """Fixed-width table, one row per router, from a run's ``expert_utilization.json``.

    ``scope`` is ``"run"`` (whole training run), ``"window"`` (last logging window) or ``"val"``
    (last validation epoch); ``final_losses`` (e.g. ``{"train_loss": 2.31}``) is printed above it.
    """
    path = find_report(run_dir)
    report = json.loads(path.read_text())
    if scope not in report["scopes"]:
        raise UserError(f"scope {scope!r} not in {path} (has {report['scopes']})")
    routers = report["routers"]
    lines = [
        f"expert utilization ({scope}) from {path}",
        f"step {report['global_step']}  E={report['num_experts']}  k={report['top_k']}  "
        f"tokens/router={routers[0][scope]['num_tokens']:,}  dead: load < {report['dead_threshold']:g}/E",
    ]
    if final_losses:
        lines.append("  ".join(f"{name}={value:.4f}" for name, value in final_losses.items()))
    header = f"{'kind':<4} {'layer':>5} {'imbal':>6} {'cv':>6} {'ent_n':>6} {'dead':>5} {'p2/p1':>6}  load/expert"
    lines += [header, "-" * len(header)]
    for router in routers:
        s = router[scope]
        lines.append(
            f"{router['kind']:<4} {router['layer']:>5} {s['imbalance']:>6.2f} {s['cv']:>6.3f} "
            f"{s['entropy_norm']:>6.3f} {s['dead_fraction']:>5.2f} {s['top1_top2_ratio']:>6.3f}  {load_bar(s['load'])}"
        )
    return "\n".join(lines)
