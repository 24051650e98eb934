"""Notebook helpers: where a trained JetMoE routes tokens, how that changed during training, and what a
sweep's results say.

Routing of a text is read from the model's own routings (``out.routings``) and summarised with the training report's statistics (:mod:`jetmoe.training.expert_metrics`), so a
notebook and ``jetmoe report`` agree on what "load", "imbalance" and "entropy" mean. Code tokens are
typed with Python's ``tokenize``: a BPE token takes the type of its first non-blank character.

Plotting functions return a ``matplotlib.figure.Figure`` (built without pyplot); the expert-load heatmap is the
one training logs and ``jetmoe report`` writes (:mod:`jetmoe.figures`).
"""

from __future__ import annotations

import io
import keyword
import math
import tokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

import jetmoe
from jetmoe import JetMoeForCausalLM
from jetmoe.errors import UserError
from jetmoe.model import Routing
from jetmoe.training.expert_metrics import ROUTER_KINDS, RouterUtilization, loads_by_kind, router_names
from jetmoe.training.reliability import read_checkpoint

ROUTING_FIELDS = ("logits_NE", "experts_Nk", "gates_Nk")  # what `Routing` is built from
ROUTER_TABLE_KEYS = ("entropy_norm", "imbalance", "dead_fraction", "top1_top2_ratio")
TOKEN_TYPES = ("identifier", "keyword", "number", "string", "comment", "punctuation", "whitespace", "other")
_TOKENIZE_TYPES = {
    tokenize.NUMBER: "number",
    tokenize.STRING: "string",
    tokenize.COMMENT: "comment",
    tokenize.OP: "punctuation",
    tokenize.NEWLINE: "whitespace",
    tokenize.NL: "whitespace",
    tokenize.INDENT: "whitespace",
}
_TOKENIZE_TYPES.update({getattr(tokenize, name): "string" for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                        if hasattr(tokenize, name)})  # Python >= 3.12


def repo_root() -> Path:
    """The source checkout the package runs from (notebooks use its experiments/ and runs/)."""
    return Path(jetmoe.__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- runs and models


def train_tiny_run(output_dir: str | Path, steps: int = 60, max_chars: int = 300_000,
                   overrides: Sequence[str] = ()) -> Path:
    """Train the default experiment shrunk to the tiny model (seconds on a CPU); returns the run dir."""
    from jetmoe.training.config import load_config
    from jetmoe.training.run import train

    every = max(1, steps // 6)
    cfg = load_config(repo_root() / "experiments/default.yaml", [
        "model=tiny", f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 2)}",
        "trainer.limit_val_batches=4", f"trainer.log_every_n_steps={every}", f"run.expert_log_every_n_steps={every}",
        f"optim.warmup_steps={min(10, steps // 4)}", "data.seq_len=64", "data.batch_size=8",
        f"data.max_chars={max_chars}", "run.sample_tokens=0", f"run.output_dir={output_dir}", "run.name=tiny",
        *overrides,
    ])
    return Path(train(cfg)["run_dir"])


def validation_text(run_dir: str | Path, max_chars: int = 20_000) -> str:
    """The run's held-out documents (same sources and split as its training), joined, capped at ``max_chars``."""
    from jetmoe.data.prepare import validation_documents
    from jetmoe.training.config import load_run_config

    cfg = load_run_config(run_dir)
    text = ""
    for doc in validation_documents(cfg.data):
        text += ("\n" if text else "") + doc
        if len(text) >= max_chars:
            break
    return text[:max_chars]


def load_checkpoints(run_dir: str | Path, model: JetMoeForCausalLM) -> dict[str, JetMoeForCausalLM]:
    """``{"step N": model}`` for every distinct step among the run's Lightning checkpoints (``checkpoints/*.ckpt``,
    e.g. the best and the last), oldest first; each a copy of ``model``'s config with that checkpoint's weights."""
    by_step = {}
    for path in sorted((Path(run_dir) / "checkpoints").glob("*.ckpt")):
        checkpoint = read_checkpoint(path)
        by_step.setdefault(checkpoint["global_step"], checkpoint["state_dict"])
    models = {}
    for step, state in sorted(by_step.items()):
        loaded = JetMoeForCausalLM(model.config)
        weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
        loaded.load_state_dict(weights)
        models[f"step {step}"] = loaded.eval()
    return models


def fresh_model(model: JetMoeForCausalLM, seed: int = 0) -> JetMoeForCausalLM:
    """An untrained model of the same config: routing at initialisation."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return JetMoeForCausalLM(model.config).eval()


# ----------------------------------------------------------------------------- routing traces


@dataclass
class RoutingTrace:
    """The routing of every token of a text: ``routings[r]`` for router r (order: layer 0 MoA, layer 0 MoE, layer 1
    MoA, ...), each over all N tokens."""

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in ``text``
    routings: list[Routing]

    @property
    def num_layers(self) -> int:
        return len(self.routings) // 2

    @property
    def num_experts(self) -> int:
        return self.routings[0].num_experts

    @property
    def top_k(self) -> int:
        return self.routings[0].top_k

    def routing(self, kind: str, layer: int) -> Routing:
        return self.routings[2 * layer + ROUTER_KINDS.index(kind)]

    def experts(self, kind: str, layer: int) -> torch.Tensor:
        """``[N, k]`` experts each token is sent to."""
        return self.routing(kind, layer).experts_Nk


@torch.no_grad()
def trace_routing(model: JetMoeForCausalLM, tokenizer: Tokenizer, text: str, window: int = 256,
                  max_tokens: int = 4096) -> RoutingTrace:
    """Route ``text`` (its first ``max_tokens`` tokens) through ``model`` in windows of ``window`` tokens."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids[:max_tokens], encoding.offsets[:max_tokens]
    if not ids:
        raise UserError("trace_routing: the text has no tokens")
    window = min(window, model.config.max_position_embeddings)
    model.eval()
    per_window = [
        model(torch.tensor([ids[start : start + window]]), use_cache=False).routings
        for start in range(0, len(ids), window)
    ]
    routings = [
        Routing(*(torch.cat([getattr(chunk[r], name) for chunk in per_window]) for name in ROUTING_FIELDS))
        for r in range(len(per_window[0]))
    ]
    return RoutingTrace(text, ids, list(offsets), routings)


def routing_stats(trace: RoutingTrace, dead_threshold: float = 0.1) -> dict[str, torch.Tensor]:
    """The training report's statistics of the trace: ``load`` ``[R, E]``, ``entropy_norm`` ``[R]``, ... ."""
    metric = RouterUtilization(len(trace.routings), trace.num_experts, trace.top_k, dead_threshold)
    metric.update(trace.routings)
    return metric.compute()


def load_matrix(stats: Mapping[str, torch.Tensor], kind: str) -> np.ndarray:
    """``[layers, experts]`` share of the top-k assignments of one router kind."""
    return stats["load"][ROUTER_KINDS.index(kind) :: 2].numpy()


def router_table(stats: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One row per router: kind, layer, normalised entropy, imbalance, dead fraction, top-2/top-1 ratio."""
    rows = []
    for r, name in enumerate(router_names(len(stats["imbalance"]) // 2)):
        kind, layer = name.split("/layer_")
        values = {key: round(float(stats[key][r]), 4) for key in ROUTER_TABLE_KEYS}
        rows.append({"kind": kind, "layer": int(layer), **values})
    return rows


# ----------------------------------------------------------------------------- token types


def classify_code_chars(text: str) -> list[str]:
    """The TOKEN_TYPES entry of every character of Python source (blank between tokens: whitespace).

    Lines are tokenized without their indentation, so text cut out of the middle of a block (a held-out
    slice of a file) still tokenizes; where tokenizing fails (say, an unterminated string at a cut) it
    restarts on the next line, characters it never reached staying ``other``.
    """
    types = ["whitespace" if char.isspace() else "other" for char in text]
    lines = io.StringIO(text).readlines()
    line_starts = np.cumsum([0] + [len(line) for line in lines])
    indents = [len(line) - len(line.lstrip(" \t\f")) for line in lines]
    first = 0
    while first < len(lines):
        first = _classify_lines(lines, first, line_starts, indents, types)
    return types


def _classify_lines(lines: list[str], first: int, line_starts: np.ndarray, indents: list[int], types: list[str]) -> int:
    """Type the characters of ``lines[first:]`` in ``types``; the line to restart from (``len(lines)``: done)."""
    dedented = "".join(line[indent:] for line, indent in zip(lines[first:], indents[first:]))

    def offset(row: int, col: int) -> int:  # (1-based row in the dedented text, column) -> index in the text
        line = first + row - 1
        return int(line_starts[line]) + indents[line] + col

    reached = first
    try:
        for tok in tokenize.generate_tokens(io.StringIO(dedented).readline):
            reached = first + tok.end[0] - 1
            kind = _token_type(tok)
            if kind is not None:
                start, end = offset(*tok.start), min(offset(*tok.end), len(types))  # NEWLINE at EOF: past the end
                types[start:end] = [kind] * (end - start)
    except (tokenize.TokenError, SyntaxError):
        return reached + 1
    return len(lines)


def _token_type(tok: tokenize.TokenInfo) -> str | None:
    if tok.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(tok.string) else "identifier"
    return _TOKENIZE_TYPES.get(tok.type)  # None: DEDENT, ENDMARKER (no characters), ERRORTOKEN (left as is)


def classify_tokens(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """A type per BPE token: that of its first non-blank character (all blank: whitespace)."""
    char_types = classify_code_chars(text)
    types = []
    for start, end in offsets:
        chosen = next((char_types[i] for i in range(start, end) if not text[i].isspace()), "whitespace")
        types.append(chosen)
    return types


def type_preference(trace: RoutingTrace, types: Sequence[str], kind: str, layer: int) -> tuple[list[str], np.ndarray]:
    """Token types present, and ``[types, experts]``: the share of each type's assignments going to each expert
    (rows sum to 1; a row equal to the router's overall load means no preference)."""
    present = [name for name in TOKEN_TYPES if name in set(types)]
    counts = _type_expert_counts(trace, types, kind, layer, present)
    return present, counts / counts.sum(1, keepdims=True)


def _type_expert_counts(trace: RoutingTrace, types: Sequence[str], kind: str, layer: int,
                        present: Sequence[str]) -> np.ndarray:
    row_of = {name: i for i, name in enumerate(present)}
    rows = np.repeat([row_of[name] for name in types], trace.top_k)
    experts = trace.experts(kind, layer).reshape(-1).numpy()
    counts = np.zeros((len(present), trace.num_experts))
    np.add.at(counts, (rows, experts), 1)
    return counts


def type_expert_information(trace: RoutingTrace, types: Sequence[str]) -> list[dict[str, Any]]:
    """Per router, the mutual information between token type and chosen expert, in bits (0: routing ignores
    the type), and as a fraction of the type entropy (1: the expert determines the type)."""
    present = [name for name in TOKEN_TYPES if name in set(types)]
    rows = []
    for layer in range(trace.num_layers):
        for kind in ROUTER_KINDS:
            joint = _type_expert_counts(trace, types, kind, layer, present)
            joint /= joint.sum()
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
            nonzero = joint > 0
            info = float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])).sum())
            type_entropy = -sum(float(p) * math.log2(p) for p in joint.sum(1) if p > 0)
            rows.append({"kind": kind, "layer": layer, "mi_bits": round(info, 4),
                         "mi_fraction": round(info / type_entropy, 4) if type_entropy > 0 else 0.0})
    return rows


def expert_top_tokens(trace: RoutingTrace, tokenizer: Tokenizer, kind: str, layer: int, n: int = 8,
                      min_count: int = 5) -> dict[int, list[str]]:
    """Per expert, the ``n`` tokens most over-represented among the tokens it receives (seen >= ``min_count`` times)."""
    experts = trace.experts(kind, layer).numpy()
    overall = Counter(trace.token_ids)
    total_tokens = len(trace.token_ids)
    top: dict[int, list[str]] = {}
    for expert in range(trace.num_experts):
        routed = Counter(token for token, chosen in zip(trace.token_ids, experts) if expert in chosen)
        size = sum(routed.values()) or 1
        frequent = {token: count for token, count in routed.items() if count >= min_count}
        lift = {token: (count / size) / (overall[token] / total_tokens) for token, count in frequent.items()}
        best = sorted(lift, key=lambda token: (-lift[token], -routed[token]))[:n]
        top[expert] = [repr(tokenizer.decode([token])) for token in best]
    return top


# ----------------------------------------------------------------------------- across training


def routing_by_stage(models: Mapping[str, JetMoeForCausalLM], tokenizer: Tokenizer, text: str,
                     max_tokens: int = 2048) -> list[dict[str, Any]]:
    """Per stage (e.g. ``{"init": ..., "step 30": ..., "final": ...}``) and router: entropy, imbalance,
    dead fraction, and the share of tokens whose top-1 expert is the one the last stage picks."""
    traces = {stage: trace_routing(model, tokenizer, text, max_tokens=max_tokens) for stage, model in models.items()}
    final = list(traces.values())[-1]
    rows = []
    for stage, trace in traces.items():
        for row in router_table(routing_stats(trace)):
            same = trace.experts(row["kind"], row["layer"])[:, 0] == final.experts(row["kind"], row["layer"])[:, 0]
            rows.append({"stage": stage, **row, "top1_agreement_with_last": round(float(same.float().mean()), 4)})
    return rows


# ----------------------------------------------------------------------------- sweeps


def interpret_sweep(rows: Sequence[Mapping[str, Any]], baseline: str | None = None) -> str:
    """A few sentences comparing every point with the dense baseline (``baseline`` or the 1-expert point) of its
    seed (a seeded sweep has one baseline run per seed; the first one stands in for a seed without its own)."""
    done = [row for row in rows if row["val_loss"] is not None]
    bases: dict[Any, Mapping[str, Any]] = {}
    for row in done:
        if _is_baseline(row, baseline):
            bases.setdefault(row.get("seed"), row)
    if not bases:
        return f"No dense baseline ({baseline or 'a 1-expert point'}) among the finished points: nothing to compare."
    first = next(iter(bases.values()))
    lines = [f"Dense baseline {dense['name']}: val loss {dense['val_loss']:.4f} (ppl {dense['val_ppl']:.2f}), "
             f"{dense['params_active']:,} active = {dense['params_total']:,} total parameters, "
             f"{dense['tokens']:,} tokens." for dense in bases.values()]
    others = sorted((row for row in done if row not in bases.values()), key=lambda row: row["val_loss"])
    lines += [_versus_dense(row, bases.get(row.get("seed"), first)) for row in others]
    if others:
        better = sum(row["val_loss"] < bases.get(row.get("seed"), first)["val_loss"] for row in others)
        lines.append(f"{better} of {len(others)} expert configurations beat the dense baseline; "
                     f"best: {others[0]['name']}.")
    return "\n".join(lines)


def _is_baseline(row: Mapping[str, Any], baseline: str | None) -> bool:
    return baseline in (row["name"], row.get("point")) if baseline else row["num_local_experts"] == 1


def _versus_dense(row: Mapping[str, Any], dense: Mapping[str, Any]) -> str:
    return (
        f"{row['name']} ({row['num_local_experts']} experts, top-{row['num_experts_per_tok']}) reaches val loss "
        f"{row['val_loss']:.4f} vs dense {dense['val_loss']:.4f} (Δ = {row['val_loss'] - dense['val_loss']:+.4f}, "
        f"{row['val_ppl'] / dense['val_ppl'] - 1:+.1%} ppl) at "
        f"{row['params_active'] / dense['params_active'] - 1:+.1%} active and "
        f"{row['params_total'] / dense['params_total']:.1f}x total parameters; "
        f"load imbalance {row['imbalance']:.2f}, {row['dead_fraction']:.0%} dead experts."
    )


def interpret_seed_summary(summary: Sequence[Mapping[str, Any]], baseline: str) -> str:
    """A sentence per point of a seeded sweep (``jetmoe.training.sweep.seed_summary``): its difference to the
    baseline, and whether it is beyond noise, i.e. larger than twice the seed spread (the standard deviation
    over the seeds of the paired difference)."""
    lines = []
    for row in summary:
        if row["point"] == baseline or row["delta_mean"] is None:
            continue
        spread = row["delta_std"]
        if spread is None:
            verdict = "one seed: no spread to compare with"
        elif abs(row["delta_mean"]) > 2 * spread:
            verdict = f"{'better' if row['delta_mean'] < 0 else 'worse'} beyond noise (|Δ| > 2 × {spread:.4f})"
        else:
            verdict = f"within noise (|Δ| ≤ 2 × {spread:.4f})"
        lines.append(f"{row['point']}: Δ = {row['delta_mean']:+.4f} nats vs {baseline} over {row['seeds']} seed(s); "
                     f"{verdict}; load imbalance {row['imbalance']:.2f}, {row['dead_fraction']:.0%} dead experts.")
    return "\n".join(lines) or f"Nothing to compare with {baseline}."


# ----------------------------------------------------------------------------- plots


def plot_load_heatmaps(stats: Mapping[str, torch.Tensor], title: str = ""):
    """Layer x expert load share for MoA and MoE side by side (:func:`jetmoe.figures.expert_load_figure`)."""
    from jetmoe.figures import expert_load_figure

    return expert_load_figure(loads_by_kind(stats["load"].numpy()), title)


def plot_type_preference(trace: RoutingTrace, types: Sequence[str], kind: str):
    """Per layer, a token type x expert heatmap of the share of each type's assignments per expert."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * trace.num_layers + 1, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, trace.num_layers, sharey=True))
    for layer, ax in enumerate(axes):
        present, share = type_preference(trace, types, kind, layer)
        vmax = min(1.0, 3 / trace.num_experts)
        image = ax.imshow(share, vmin=0, vmax=vmax, cmap="magma", aspect="auto")
        _annotate(ax, share, vmax)
        ax.set(title=f"{kind.upper()} layer {layer}", xlabel="expert", xticks=range(trace.num_experts),
               yticks=range(len(present)), yticklabels=present)
    fig.colorbar(image, ax=axes, label="share of the type's assignments")
    return fig


def plot_stage_entropy(rows: Sequence[Mapping[str, Any]]):
    """Normalised router entropy per layer, one line per stage, MoA and MoE panels (rows: ``routing_by_stage``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    for ax, kind in zip(axes, ROUTER_KINDS):
        for stage in stages:
            line = [row for row in rows if row["stage"] == stage and row["kind"] == kind]
            ax.plot([row["layer"] for row in line], [row["entropy_norm"] for row in line], "o-", label=stage)
        layers = sorted({row["layer"] for row in rows})
        ax.set(title=f"{kind.upper()} router entropy", xlabel="layer", ylim=(0, 1.05), xticks=layers)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("entropy / log E (1 = uniform)")
    axes[0].legend()
    return fig


def plot_seed_summary(summary: Sequence[Mapping[str, Any]]):
    """Per point of a seeded sweep: the difference in validation loss to the baseline (mean, bars at ± one standard
    deviation over the seeds) and the dead-expert fraction."""
    from matplotlib.figure import Figure

    rows = [row for row in summary if row["delta_mean"] is not None]
    fig = Figure(figsize=(11, 3.5), layout="constrained")
    delta_ax, dead_ax = fig.subplots(1, 2)
    x = np.arange(len(rows))
    delta_ax.bar(x, [row["delta_mean"] for row in rows], yerr=[row["delta_std"] or 0 for row in rows], capsize=4)
    delta_ax.axhline(0, color="k", linewidth=0.8)
    delta_ax.set_ylabel("Δ val loss vs baseline (nats; ± 1 std)")
    dead_ax.bar(x, [row["dead_fraction"] or 0 for row in rows])
    dead_ax.set_ylabel("dead-expert fraction")
    for ax in (delta_ax, dead_ax):
        ax.set_xticks(x, [row["point"] for row in rows], rotation=45, ha="right")
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_utilization(rows: Sequence[Mapping[str, Any]]):
    """Per sweep point: mean load imbalance and dead-expert fraction of MoA and MoE routers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    x = np.arange(len(rows))
    for ax, metric, label in zip(axes, ("imbalance", "dead_fraction"), ("max load / mean load (1 = balanced)",
                                                                          "dead-expert fraction")):
        for offset, kind in zip((-0.2, 0.2), ROUTER_KINDS):
            ax.bar(x + offset, [row[f"{kind}_{metric}"] or 0 for row in rows], width=0.4, label=kind.upper())
        ax.set_xticks(x, [row["name"] for row in rows], rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    return fig


def _annotate(ax, values: np.ndarray, vmax: float) -> None:
    """Write each value in its cell (up to 64 cells): white on the dark lower half of the colour scale."""
    if values.size > 64:
        return
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < vmax / 2 else "k")
