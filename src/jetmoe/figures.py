"""Figures a person reads: expert-load heatmaps, routing over training, training and downstream curves.

The same functions draw TensorBoard images during training (:func:`figure_to_rgb`), the PNGs ``jetmoe report``
writes into a run directory (:func:`save_png`), the model card's figures and the notebooks' plots. They take plain
arrays (no model, no run directory) and return a ``matplotlib.figure.Figure`` built without pyplot, so drawing never
needs a display or touches global state.

Expert load is the share of a router's top-k assignments that go to each expert: 1/E everywhere is perfectly
balanced. Heatmaps use a diverging scale centred there (white = balanced, red = more than its share, blue = less).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

STEP_LABEL = "optimizer step"
MAX_ANNOTATED_CELLS = 256  # per panel; beyond that the numbers would not be legible
MAX_SHARE_ROWS = 6  # layers drawn in the expert-share figure (evenly spaced when there are more)
PNG_DPI = 110


# ----------------------------------------------------------------------------- output


def figure_to_rgb(fig: Figure, dpi: int = PNG_DPI) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of ``fig`` (for ``SummaryWriter.add_image(..., dataformats="HWC")``)."""
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | Path, dpi: int = PNG_DPI) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- routing


def expert_load_figure(loads: Mapping[str, np.ndarray], title: str = "") -> Figure:
    """Side-by-side layer x expert heatmaps, one per router kind (``{"MoA": [L, E], "MoE": [L, E]}``), sharing a
    colour bar centred on the balanced share 1/E (marked on the bar); each cell shows its share in percent."""
    num_layers, num_experts = next(iter(loads.values())).shape
    balanced = 1 / num_experts
    top = max(2 * balanced, max(float(np.max(load)) for load in loads.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top)
    width = 2.2 + len(loads) * (1.2 + 0.45 * num_experts)
    fig = Figure(figsize=(width, 1.7 + 0.38 * num_layers), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(loads), sharey=True))
    for ax, (kind, load_LE) in zip(axes, loads.items()):
        image = ax.imshow(load_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        imbalance = num_experts * load_LE.max(axis=1)
        ax.set_title(f"{kind}: % of top-k assignments per expert\n(max / mean load per layer: "
                     f"{imbalance.min():.2f} to {imbalance.max():.2f})", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers))
        if load_LE.size <= MAX_ANNOTATED_CELLS:
            for (layer, expert), value in np.ndenumerate(load_LE):
                dark = abs(norm(value) - 0.5) > 0.3
                ax.text(expert, layer, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    axes[0].set_ylabel("layer")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, label="share of top-k assignments")
    ticks = [0.0, balanced / 2, balanced, 1.5 * balanced, 2 * balanced] + ([top] if top > 2.6 * balanced else [])
    bar.set_ticks(ticks, labels=[f"{100 * t:.1f}%" + (" = 1/E\n(balanced)" if t == balanced else "") for t in ticks])
    bar.ax.axhline(balanced, color="black", linewidth=1.5)
    if title:
        fig.suptitle(title)
    return fig


def imbalance_over_time_figure(steps: Sequence[int], loads: Mapping[str, np.ndarray], title: str = "") -> Figure:
    """Per-layer load imbalance (E x max expert share; 1 = balanced) against the step, one panel per router kind
    (``loads[kind]`` is ``[steps, L, E]``)."""
    fig = Figure(figsize=(5.2 * len(loads), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(loads), sharey=True))
    for ax, (kind, load_SLE) in zip(axes, loads.items()):
        imbalance_SL = load_SLE.shape[-1] * load_SLE.max(axis=-1)
        colors = _layer_colors(load_SLE.shape[1])
        for layer in range(load_SLE.shape[1]):
            ax.plot(steps, imbalance_SL[:, layer], "-", marker="." if len(steps) < 40 else None, color=colors[layer],
                    label=f"layer {layer}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(title=f"{kind}: load imbalance per layer", xlabel=STEP_LABEL)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("max / mean expert load (1 = balanced)")
    axes[0].set_ylim(bottom=0.9)
    _legend(axes[-1], load_SLE.shape[1])
    if title:
        fig.suptitle(title)
    return fig


def expert_share_over_time_figure(steps: Sequence[int], loads: Mapping[str, np.ndarray], title: str = "") -> Figure:
    """Each expert's share of the tokens against the step, for up to MAX_SHARE_ROWS layers (rows) and each router
    kind (columns); the dashed line is the balanced share 1/E."""
    num_layers, num_experts = next(iter(loads.values())).shape[1:]
    layers = sorted({round(x) for x in np.linspace(0, num_layers - 1, min(num_layers, MAX_SHARE_ROWS))})
    fig = Figure(figsize=(4.6 * len(loads) + 1.4, 0.4 + 1.9 * len(layers)), layout="constrained")
    axes = np.array(fig.subplots(len(layers), len(loads), sharex=True, sharey=True, squeeze=False))
    colors = _expert_colors(num_experts)
    for col, (kind, load_SLE) in enumerate(loads.items()):
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            for expert in range(num_experts):
                ax.plot(steps, 100 * load_SLE[:, layer, expert], color=colors[expert], linewidth=1.3,
                        label=f"expert {expert}")
            ax.axhline(100 / num_experts, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{kind} layer {layer}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[-1, col].set_xlabel(STEP_LABEL)
    for row in range(len(layers)):
        axes[row, 0].set_ylabel("share (%)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=f"dashed: 1/E = {100 / num_experts:.1f}%",
               title_fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- curves


def curves_figure(panels: Sequence[Mapping], title: str = "") -> Figure:
    """Line plots side by side. Each panel: ``{"title", "ylabel", "series": {label: (steps, values)},
    "hlines": {label: y}}`` (``hlines`` optional: dashed reference levels such as chance accuracy)."""
    fig = Figure(figsize=(5.0 * len(panels), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels):
        for label, (x, y) in panel["series"].items():
            ax.plot(x, y, "-", marker="." if len(x) < 40 else None, label=label)
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set(title=panel["title"], xlabel=STEP_LABEL, ylabel=panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- helpers


def _layer_colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0, 0.9, n)]


def _expert_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax, num_lines: int) -> None:
    if num_lines <= 12:
        ax.legend(fontsize=8, ncol=1 if num_lines <= 6 else 2)
