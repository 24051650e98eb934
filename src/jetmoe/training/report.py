"""A run directory as figures and a model card: the PNGs ``jetmoe report`` writes, and the card the HF export carries.

Figures (``RUN_DIR/figures/``), each drawn when the run has its data:

    loss.png                    train and validation cross-entropy, learning rate (TensorBoard scalars)
    downstream.png              downstream accuracy per task, acc and acc_norm against chance (downstream.json)
    expert_load.png             layer x expert load over the whole run, MoA and MoE (expert_utilization.json)
    imbalance_over_time.png     each layer's load imbalance per logged window (expert_utilization.json history)
    expert_share_over_time.png  each expert's share per logged window (same)

The model card (:func:`model_card`) takes the run's config, ``metrics.json``, the last downstream evaluation and
the latest lm-evaluation-harness result per task in ``RUN_DIR/eval/`` (``jetmoe eval --tasks``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jetmoe import figures
from jetmoe.config import JetMoeConfig
from jetmoe.eval.callback import DOWNSTREAM_JSON
from jetmoe.hf_export import CardMetric, ModelCard, complete_hf_dir
from jetmoe.training.config import RUN_CONFIG, read_yaml
from jetmoe.training.expert_callback import REPORT_JSON
from jetmoe.training.expert_metrics import loads_by_kind

FIGURES_DIR, EVAL_DIR, TENSORBOARD = "figures", "eval", "tb"
LM_EVAL_KIND = "lm_eval"  # RUN_DIR/eval/lm_eval-<UTC time>.json, written by jetmoe eval --tasks
LOSS_TAGS = {"train/ce": "train", "val/loss": "validation"}
LIGHTNING_STEP_OFFSET = 1  # Lightning logs at the 0-based index of the batch: val/loss after 100 updates at step 99


# ----------------------------------------------------------------------------- reading a run


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_scalars(run_dir: str | Path, tags: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` of the run's TensorBoard scalars logged by Lightning (tags it lacks are left out),
    the steps counted as optimizer steps done, like the downstream and routing figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(run_dir) / TENSORBOARD
    if not tb_dir.is_dir():
        return {}
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    watcher_log = logging.getLogger("tensorboard")
    level = watcher_log.level
    watcher_log.setLevel(logging.WARNING)  # "No path found after <file>" at INFO: the normal end of the files
    try:
        events.Reload()
    finally:
        watcher_log.setLevel(level)
    present = set(events.Tags()["scalars"])
    return {tag: ([e.step + LIGHTNING_STEP_OFFSET for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in tags if tag in present}


def latest_lm_eval_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{task: {"metrics": {metric: value}, "version": ..., "num_fewshot": ..., "items": scored or None,
    "of_items": the task's or None, "partial": bool, "file": ...}}`` from ``RUN_DIR/eval/lm_eval-*.json``: per task
    the newest result on all items, else the newest partial one (``jetmoe eval --limit N``), so that a quick
    check on a few items never hides a full evaluation."""
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted((Path(run_dir) / EVAL_DIR).glob(f"{LM_EVAL_KIND}-*.json")):  # names sort by time
        result = json.loads(path.read_text())
        for task, values in result.get("results", {}).items():
            metrics = {key.split(",")[0]: value for key, value in values.items()
                       if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            samples = result.get("n-samples", {}).get(task, {})
            items, of_items = samples.get("effective"), samples.get("original")
            limit = result.get("limit", result.get("config", {}).get("limit"))  # lm-eval's own record: older files
            partial = limit is not None and (items is None or of_items is None or items < of_items)
            if partial and task in latest and not latest[task]["partial"]:
                continue
            latest[task] = {"metrics": metrics, "lm_eval_version": result.get("lm_eval_version", ""),
                            "num_fewshot": result.get("n-shot", {}).get(task), "items": items,
                            "of_items": of_items, "partial": partial, "file": path.name}
    return latest


# ----------------------------------------------------------------------------- figures


def run_figures(run_dir: str | Path) -> dict[str, tuple[str, Figure]]:
    """``{file name: (caption, figure)}`` of the figures the run has data for (see the module docstring)."""
    run_dir = Path(run_dir)
    drawn: dict[str, tuple[str, Figure]] = {}

    scalars = read_scalars(run_dir, [*LOSS_TAGS, "train/lr"])
    if any(tag in scalars for tag in LOSS_TAGS):
        panels = [{"title": "cross-entropy", "ylabel": "nats per token",
                   "series": {label: scalars[tag] for tag, label in LOSS_TAGS.items() if tag in scalars}}]
        if "train/lr" in scalars:
            panels.append({"title": "learning rate", "ylabel": "lr", "series": {"lr": scalars["train/lr"]}})
        drawn["loss.png"] = ("Training loss", figures.curves_figure(panels))

    downstream = read_json(run_dir / DOWNSTREAM_JSON)
    if downstream and downstream["history"]:
        panels = []
        for task, info in downstream["tasks"].items():
            entries = [e for e in downstream["history"] if task in e["tasks"]]
            steps = [e["step"] for e in entries]
            panels.append({
                "title": f"{task} ({info['items']} items)", "ylabel": "accuracy",
                "series": {key: (steps, [e["tasks"][task][key] for e in entries]) for key in ("acc", "acc_norm")},
                "hlines": {f"chance ({info['chance']:.0%})": info["chance"]},
            })
        drawn["downstream.png"] = ("Downstream accuracy during training", figures.curves_figure(panels))

    report = read_json(run_dir / REPORT_JSON)
    if report:
        scope = "run" if "run" in report["scopes"] else report["scopes"][0]
        load_RE = np.array([router[scope]["load"] for router in report["routers"]])
        tokens = report["routers"][0][scope]["num_tokens"]
        title = f"expert load, whole run to step {report['global_step']} ({tokens:,} tokens per router)"
        drawn["expert_load.png"] = ("Expert load", figures.expert_load_figure(loads_by_kind(load_RE), title))
        history = report.get("history") or {}
        if len(history.get("step", [])) > 1:
            loads = loads_by_kind(np.array(history["load"]))
            drawn["imbalance_over_time.png"] = (
                "Load imbalance during training", figures.imbalance_over_time_figure(history["step"], loads))
            drawn["expert_share_over_time.png"] = (
                "Expert shares during training", figures.expert_share_over_time_figure(history["step"], loads))
    return drawn


def write_figures(run_dir: str | Path) -> dict[str, Path]:
    """Draw the run's figures into ``RUN_DIR/figures/``; ``{caption: path}`` of those it had data for."""
    out = Path(run_dir) / FIGURES_DIR
    return {caption: figures.save_png(fig, out / name) for name, (caption, fig) in run_figures(run_dir).items()}


# ----------------------------------------------------------------------------- model card


def model_card(run_dir: str | Path, figure_paths: dict[str, Path] | None = None) -> ModelCard:
    """The card of a run: its config, final metrics, downstream and lm-eval results, and figures."""
    run_dir = Path(run_dir)
    config_file = run_dir / RUN_CONFIG
    cfg = read_yaml(config_file) if config_file.is_file() else {}
    metrics = read_json(run_dir / "metrics.json") or {}
    card_metrics = _loss_metrics(cfg, metrics) + _downstream_metrics(run_dir) + _lm_eval_metrics(run_dir)
    return ModelCard(
        name=cfg.get("run", {}).get("name", run_dir.name),
        training_data=describe_data(cfg),
        training=_training_facts(cfg, metrics),
        training_config=config_file.read_text() if config_file.is_file() else "",
        metrics=card_metrics,
        figures=figure_paths or {},
        datasets=[src["hub_name"] for src in _sources(cfg).values() if src.get("kind") == "hub" and src.get("hub_name")],
    )


def complete_export(run_dir: str | Path, hf_dir: str | Path, config: JetMoeConfig, tokenizer: str | Path | None) -> None:
    """Figures, model card and tokenizer / generation files for a run's HF directory (``jetmoe train``'s export,
    ``jetmoe consolidate``, and after ``jetmoe eval --tasks`` adds results)."""
    complete_hf_dir(hf_dir, config, tokenizer, card=model_card(run_dir, write_figures(run_dir)))


def _sources(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's named data sources (the built-in corpus when none is named)."""
    return cfg.get("data", {}).get("sources") or {"stdlib": {"kind": "stdlib"}}


def _dataset_id(sources: dict[str, dict[str, Any]]) -> str:
    """The card's dataset id for the validation loss: the source's, or `training-mixture` for several."""
    if len(sources) != 1:
        return "training-mixture"
    (src,) = sources.values()
    return {"stdlib": "python-stdlib", "hub": src.get("hub_name")}.get(src.get("kind")) or "training-corpus"


def _describe_source(src: dict[str, Any]) -> str:
    kind = src.get("kind", "stdlib")
    if kind == "stdlib":
        return ("the `.py` files of the Python standard library that ran the training, "
                + ("test suites included" if src.get("stdlib_include_tests") else "test suites excluded"))
    if kind == "files":
        return "local files " + ", ".join(f"`{f}`" for f in src.get("data_files", []))
    if kind == "hub":
        return (f"the `{src.get('hub_name')}` dataset" + (f" (`{src['hub_config']}`)" if src.get("hub_config") else "")
                + f", split `{src.get('hub_split', 'train')}`")
    return f"a `datasets` directory `{src.get('disk_path')}`"


def describe_data(cfg: dict[str, Any]) -> str:
    data = cfg.get("data", {})
    sources = _sources(cfg)
    if len(sources) == 1:
        what = _describe_source(next(iter(sources.values()))).capitalize() + "."
    else:
        what = "A mixture: " + "; ".join(f"`{name}` (weight {src.get('weight', 1)}), {_describe_source(src)}"
                                         for name, src in sources.items()) + "."
    for phase in data.get("phases", []):
        what += f" From step {phase.get('start')}: weights {phase.get('weights')}."
    details = [f"{data.get('val_fraction', 0.05):.0%} of the documents held out for validation"]
    if data.get("max_chars"):
        details.append(f"the first {data['max_chars']:,} characters of each source")
    tokenizer = f"`{data['tokenizer_path']}`" if data.get("tokenizer_path") else "a byte-level BPE trained on the corpus"
    details.append(f"tokenizer: {tokenizer}")
    details.append(f"packed into windows of {data.get('seq_len', '?')} tokens, EOS between documents")
    return what + " " + "; ".join(details) + "."


def _training_facts(cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    data, optim, trainer = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("trainer", {})
    facts: dict[str, Any] = {}
    if metrics.get("step") is not None:
        facts["optimizer steps"] = metrics["step"]
    if metrics.get("tokens_seen") is not None:
        facts["tokens seen"] = metrics["tokens_seen"]
    if data:
        facts["tokens per step (per device)"] = (
            data.get("seq_len", 0) * data.get("batch_size", 0) * trainer.get("accumulate_grad_batches", 1))
    if optim:
        facts["optimizer"] = (f"AdamW, lr {optim.get('lr')}, {optim.get('schedule')} schedule, "
                              f"{optim.get('warmup_steps')} warmup steps, weight decay {optim.get('weight_decay')}")
    if trainer:
        facts["precision"] = trainer.get("precision")
    for key, label in (("train_loss", "final train loss"), ("val_loss", "final validation loss")):
        if metrics.get(key) is not None:
            facts[label] = round(metrics[key], 4)
    if metrics.get("wall_time_s") is not None:
        minutes, seconds = divmod(round(metrics["wall_time_s"]), 60)
        facts["wall time"] = f"{minutes}m{seconds:02d}s"
    if metrics.get("tokens_per_sec") is not None:
        facts["tokens / s"] = round(metrics["tokens_per_sec"])
    return facts


def _loss_metrics(cfg: dict[str, Any], metrics: dict[str, Any]) -> list[CardMetric]:
    if metrics.get("val_loss") is None:
        return []
    dataset = _dataset_id(_sources(cfg))
    name = "held-out documents of the training corpus"
    return [CardMetric(dataset, "loss", metrics["val_loss"], name, "validation cross-entropy (nats/token)", "jetmoe"),
            CardMetric(dataset, "perplexity", metrics["val_ppl"], name, "validation perplexity", "jetmoe")]


def _downstream_metrics(run_dir: Path) -> list[CardMetric]:
    downstream = read_json(run_dir / DOWNSTREAM_JSON)
    if not downstream or not downstream["history"]:
        return []
    last = downstream["history"][-1]
    source = f"jetmoe downstream callback, step {last['step']}, 0-shot"
    return [CardMetric(task, key, result[key], f"{task} ({result['items']} items)", key, source)
            for task, result in last["tasks"].items() for key in ("acc", "acc_norm")]


def _lm_eval_metrics(run_dir: Path) -> list[CardMetric]:
    """lm-eval's results, each named with its number of items; a partial one (``--limit``) stays out of
    model-index, where it would replace a value computed on every item."""
    rows = []
    for task, result in latest_lm_eval_results(run_dir).items():
        shots = f", {result['num_fewshot']}-shot" if result["num_fewshot"] is not None else ""
        source = f"lm-evaluation-harness {result['lm_eval_version']}{shots}".strip()
        items, of_items = result["items"], result["of_items"]
        if result["partial"]:
            name = f"{task} ({items} of {of_items} items)" if items and of_items else f"{task} (part of its items)"
        else:
            name = f"{task} ({items} items)" if items else task
        rows += [CardMetric(task, metric, value, name, metric, source, partial=result["partial"])
                 for metric, value in result["metrics"].items()]
    return rows
