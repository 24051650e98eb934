"""The figures: labelled axes, the balanced share on the colour bar, numbers in the cells, pixels for TensorBoard."""

from __future__ import annotations

import numpy as np
import pytest

from jetmoe.figures import (
    MAX_SHARE_ROWS,
    curves_figure,
    expert_load_figure,
    expert_share_over_time_figure,
    figure_to_rgb,
    imbalance_over_time_figure,
    save_png,
)

RNG = np.random.default_rng(0)


def loads(*shape):
    return RNG.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def test_expert_load_heatmaps_are_labelled_side_by_side():
    fig = expert_load_figure({"MoA": loads(4, 8), "MoE": loads(4, 8)}, title="step 100")
    moa, moe, bar = fig.axes
    assert moa.get_title().startswith("MoA") and moe.get_title().startswith("MoE")
    assert moa.get_xlabel() == "expert" and moa.get_ylabel() == "layer"
    assert [t.get_text() for t in moa.get_xticklabels()] == [str(e) for e in range(8)]
    assert len(moa.texts) == 32  # every cell's share, in percent
    assert any("1/E" in label.get_text() and "12.5%" in label.get_text() for label in bar.get_yticklabels())
    assert fig.get_suptitle() == "step 100"


def test_heavily_imbalanced_load_extends_the_colour_scale():
    load = np.full((2, 4), 0.0)
    load[:, 0] = 1.0
    bar = expert_load_figure({"MoA": load, "MoE": load}).axes[-1]
    assert bar.get_ylim()[1] == pytest.approx(1.0)
    assert "100.0%" in [label.get_text() for label in bar.get_yticklabels()]


def test_routing_over_time_figures():
    steps = [50, 100, 150]
    fig = imbalance_over_time_figure(steps, {"MoA": loads(3, 4, 8), "MoE": loads(3, 4, 8)})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4 + 1  # a line per layer and the balanced level
    np.testing.assert_allclose(fig.axes[1].lines[0].get_xdata(), steps)
    fig = expert_share_over_time_figure(steps, {"MoA": loads(3, 24, 8), "MoE": loads(3, 24, 8)})
    assert len(fig.axes) == 2 * MAX_SHARE_ROWS  # 24 layers: evenly spaced ones, first and last included
    assert fig.axes[0].get_title() == "MoA layer 0" and fig.axes[-1].get_title() == "MoE layer 23"


def test_curves_rgb_and_png(tmp_path):
    fig = curves_figure([{"title": "task", "ylabel": "accuracy", "series": {"acc": ([0, 10], [0.25, 0.5])},
                          "hlines": {"chance": 0.25}}])
    assert [line.get_label() for line in fig.axes[0].lines] == ["acc", "chance"]
    pixels = figure_to_rgb(fig)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and pixels.shape[1] > 400
    path = save_png(fig, tmp_path / "sub" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
