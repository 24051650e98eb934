"""Sweeps: a tiny two-point grid end to end (results files, skipping finished points), active-parameter
matching of the shipped ablations (no training), and one-line ConfigErrors for bad sweep files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jetmoe import JetMoeConfig
from jetmoe.training.config import ConfigError
from jetmoe.training.matching import matched_intermediate_size, relative_gap
from jetmoe.training.sweep import (
    format_plan,
    format_table,
    load_sweep,
    plan_sweep,
    plot_results,
    read_results,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "experiments/default.yaml"
TINY = """\
  model: tiny
  trainer.max_steps: 4
  trainer.val_check_interval: 2
  trainer.limit_val_batches: 1
  trainer.log_every_n_steps: 2
  run.expert_log_every_n_steps: 2
  optim.warmup_steps: 1
  data.seq_len: 32
  data.batch_size: 4
  data.max_chars: 50000
  run.sample_tokens: 0
"""


DENSE_POINT = """\
  - name: dense
    overrides: {model.num_local_experts: 1, model.num_experts_per_tok: 1}
"""


def write_sweep(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def write_tiny_sweep(root: Path, body: str, cache: bool = True) -> Path:
    """A sweep over the default experiment at the tiny size (`TINY`), its runs under `root/out`, then `body`."""
    cache_line = f"  data.cache_dir: {root}/cache\n" if cache else ""
    return write_sweep(root, f"base: {DEFAULT}\nsweep_dir: {root}/out\noverrides:\n{TINY}{cache_line}{body}")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> tuple[Path, object]:
    """A two-point grid (1 and 2 experts, top-1), active-parameter matched, trained once for the module."""
    root = tmp_path_factory.mktemp("sweep")
    path = write_tiny_sweep(root, """\
grid:
  model.num_local_experts: [1, 2]
  model.num_experts_per_tok: [1, 2]
match_active_params: true
""")
    return path, run_sweep(path)


def test_grid_sweep_writes_csv_markdown_and_plot(finished_sweep):
    _, result = finished_sweep
    assert result.ran == ["e1_k1", "e2_k1", "e2_k2"] and result.skipped == []  # e1_k2 (top-2 of 1 expert) left out
    assert [row["name"] for row in result.rows] == result.ran
    assert read_results(result.sweep_dir) == result.rows  # the CSV round-trips with its types
    for row in result.rows:
        assert row["tokens"] == 4 * 4 * 32 and math.isfinite(row["val_loss"])
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-4)
        assert 1.0 <= row["imbalance"] <= row["num_local_experts"] and 0.0 <= row["dead_fraction"] <= 1.0
        assert abs(relative_gap(row["params_active"], result.rows[0]["params_active"])) <= 0.02
    markdown = result.md_path.read_text()
    assert "| e2_k2 |" in markdown and "num_local_experts=2" in markdown and "val ppl" in markdown
    assert result.plot_path.stat().st_size > 10_000  # a real PNG
    assert "trained 3, skipped 0" in format_table(result)


def test_rerun_skips_finished_points(finished_sweep):
    path, first = finished_sweep
    metrics = [Path(row["run_dir"]) / "metrics.json" for row in first.rows]
    stamps = [p.stat().st_mtime_ns for p in metrics]
    again = run_sweep(path)
    assert again.ran == [] and again.skipped == ["e1_k1", "e2_k1", "e2_k2"]
    assert [p.stat().st_mtime_ns for p in metrics] == stamps
    assert again.rows == first.rows


def test_a_changed_point_config_is_not_mixed_with_an_old_run(finished_sweep):
    path, _ = finished_sweep
    with pytest.raises(ConfigError, match=r"holds a run with trainer\.max_steps=4, point e1_k1 now has 5"):
        run_sweep(path, ["trainer.max_steps=5"])


def test_only_trains_the_named_points_and_sweep_dir_moves_the_sweep(finished_sweep, tmp_path):
    path, _ = finished_sweep
    spec = load_sweep(path, [f"sweep_dir={tmp_path}/elsewhere", "only=e2_k1"])
    assert spec.only == ("e2_k1",) and spec.sweep_dir == tmp_path / "elsewhere"
    assert {point.config.run.output_dir for point in plan_sweep(spec)} == {str(tmp_path / "elsewhere")}


SHIPPED_GRIDS = {
    "ablate_experts": {(e, k) for e in (1, 2, 4, 8, 16) for k in (1, 2) if k <= e},
    "ablate_experts_smoke": {(1, 1), (2, 2), (4, 2), (8, 2)},
}


@pytest.mark.parametrize("name", sorted(SHIPPED_GRIDS))
def test_shipped_ablations_match_active_parameters_at_equal_tokens(name):
    points = {point.name: point for point in plan_sweep(load_sweep(REPO / f"experiments/{name}.yaml"))}
    assert {(p.config.model.num_local_experts, p.config.model.num_experts_per_tok) for p in points.values()} == SHIPPED_GRIDS[name]
    reference = points["e8_k2"].params["active"]
    for point in points.values():
        assert abs(relative_gap(point.params["active"], reference)) <= 0.02, format_plan(list(points.values()))
    dense = points["dense"]
    assert (dense.config.model.num_local_experts, dense.config.model.num_experts_per_tok) == (1, 1)
    assert dense.params["total"] == dense.params["active"]
    tokens = {(p.config.trainer.max_steps, p.config.data.batch_size, p.config.data.seq_len) for p in points.values()}
    assert len(tokens) == 1
    assert {tuple(p.config.data.sources) for p in points.values()} == {("stdlib",)}


@pytest.mark.parametrize("experts,top_k", [(1, 1), (4, 1), (16, 2), (64, 4)])
def test_matched_intermediate_size_is_within_one_step(experts, top_k):
    reference = JetMoeConfig.from_name("small")
    target = reference.num_parameters()["active"]
    config = reference.replace(num_local_experts=experts, num_experts_per_tok=top_k)
    size = matched_intermediate_size(config, target, multiple_of=8)
    assert size % 8 == 0
    step = 8 * 3 * config.hidden_size * top_k * config.num_hidden_layers  # active params per 8 hidden units
    assert abs(config.replace(intermediate_size=size).num_parameters()["active"] - target) <= step / 2


BAD_SWEEPS = [
    ("grid: {{model.num_local_experts: [1]}}\n", "sweep.yaml: base must name"),
    ("base: nowhere.yaml\ngrid: {{model.num_local_experts: [1]}}\n", "sweep.yaml: base: nowhere.yaml not found"),
    ("base: {default}\ngird: {{model.num_local_experts: [1]}}\n", "sweep.yaml: unknown key 'gird'"),
    ("base: {default}\n", "sweep.yaml: needs a 'grid'"),
    ("base: {default}\ngrid: {{model.num_local_experts: 2}}\n", "sweep.yaml: grid.model.num_local_experts must be a non-empty list"),
    ("base: {default}\ngrid: {{model.num_expert: [2]}}\n", "sweep.yaml: point num_expert2: unknown key 'model.num_expert'"),
    ("base: {default}\npoints: [{{overrides: {{}}}}]\n", "sweep.yaml: points[0]: needs a 'name'"),
    ("base: {default}\npoints: [{{name: a, override: {{}}}}]\n", "sweep.yaml: points[0]: unknown key 'override'"),
    ("base: {default}\npoints: [{{name: a}}, {{name: a}}]\n", "sweep.yaml: two points are named 'a'"),
    ("base: {default}\npoints: [{{name: a, overrides: 3}}]\n", "sweep.yaml: points[0].overrides must be a mapping"),
    ("base: {default}\noverrides: [trainer.max_steps]\npoints: [{{name: a}}]\n", "sweep.yaml: overrides: 'trainer.max_steps' is not"),
    ("base: {default}\noverrides: {{optim.lr: fast}}\npoints: [{{name: a}}]\n", "sweep.yaml: overrides: 'optim.lr' expects float"),
    ("base: {default}\noverrides: {{run.name: x}}\npoints: [{{name: a}}]\n", "sweep.yaml: overrides: run.name is set by the sweep"),
    ("base: {default}\npoints: [{{name: a}}]\nmatch_active_params: {{reference: b}}\n",
     "sweep.yaml: match_active_params.reference: no point named 'b'"),
    ("base: {default}\npoints: [{{name: a}}]\nmatch_active_params: {{tolerance: 2}}\n",
     "sweep.yaml: match_active_params.tolerance must be"),
    ("base: {default}\npoints: [{{name: a}}]\nmatch_active_params: {{refrence: a}}\n",
     "sweep.yaml: match_active_params: unknown key 'refrence'"),
    ("base: {default}\npoints: [{{name: a, overrides: {{model.intermediate_size: 64}}}}]\nmatch_active_params: true\n",
     "sweep.yaml: point a: model.intermediate_size is chosen by match_active_params"),
    ("base: {default}\npoints: [{{name: a, overrides: {{model.num_experts_per_tok: 9}}}}]\n",
     "sweep.yaml: point a: model.num_experts_per_tok (9) must be <="),
    ("base: {default}\npoints: [{{name: a}}, {{name: b, overrides: {{model.num_local_experts: 16, model.num_experts_per_tok: 16}}}}]\n"
     "match_active_params: {{reference: a}}\n", "sweep.yaml: match_active_params: point b gets"),  # attention alone is too big
    ("base: {default}\ngrid: [1, 2\n", "sweep.yaml: invalid YAML"),
    ("base: {default}\npoints: [{{name: a}}]\nseeds: [1, 1]\n", "sweep.yaml: seeds must be a non-empty list of distinct"),
    ("base: {default}\npoints: [{{name: a}}]\nseeds: 3\n", "sweep.yaml: seeds must be a non-empty list"),
    ("base: {default}\npoints: [{{name: a}}]\nbaseline: b\n", "sweep.yaml: baseline: no point named 'b'"),
    ("base: {default}\npoints: [{{name: a, upcycle: b}}, {{name: b}}]\n",
     "sweep.yaml: point a: upcycle must name an earlier point, got 'b'"),
    ("base: {default}\npoints: [{{name: a, match: 0}}]\n", "sweep.yaml: points[0].match must be true or false"),
    ("base: {default}\npoints: [{{name: a}}, {{name: b, upcycle: a, overrides: {{model.upcycle_from: x}}}}]\n",
     "sweep.yaml: points[1]: model.upcycle_from is set by upcycle: a"),
]


@pytest.mark.parametrize("body,message", BAD_SWEEPS)
def test_bad_sweep_files_name_the_file_and_key(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, body.format(default=DEFAULT))
    with pytest.raises(ConfigError) as err:
        plan_sweep(load_sweep(path))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("only=a,zz", "command line: only: no point named 'zz'"),
    ("seeds=1,x", "command line: seeds must be a non-empty list of distinct integers"),
    ("model.num_expert=2", "command line: unknown key 'model.num_expert'"),
    ("run.output_dir=x", "command line: run.output_dir is set by the sweep"),
])
def test_bad_command_line_overrides_blame_the_command_line(tmp_path, override, message):
    path = write_sweep(tmp_path, f"base: {DEFAULT}\npoints: [{{name: a}}]\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(path, [override])


def test_plot_draws_one_line_per_top_k_and_variant():
    pytest.importorskip("matplotlib")
    row = dict(val_loss=4.0, params_total=2_000_000, params_active=1_000_000, num_experts_per_tok=2)
    rows = [
        {**row, "name": "dense", "num_local_experts": 1, "num_experts_per_tok": 1,
         "overrides": "model.num_local_experts=1 model.num_experts_per_tok=1 model.intermediate_size=600"},
        {**row, "name": "e4_k2", "num_local_experts": 4, "overrides": "model.num_local_experts=4"},
        {**row, "name": "e8_k2", "num_local_experts": 8, "overrides": "model.num_local_experts=8"},
        {**row, "name": "e8_k2_global", "num_local_experts": 8,
         "overrides": "model.num_local_experts=8 model.balancing=aux_global model.intermediate_size=256"},
    ]
    experts_ax = plot_results(rows).axes[0]
    lines = {line.get_label(): list(line.get_xdata()) for line in experts_ax.get_lines() if line.get_marker() == "o"}
    assert lines == {"MoA+MoE top-2": [4, 8], "MoA+MoE top-2, balancing=aux_global": [8]}


def test_seeds_expand_every_point_and_unmatched_points_keep_their_width(tmp_path):
    path = write_tiny_sweep(tmp_path, f"""\
grid:
  model.num_local_experts: [4]
points:
{DENSE_POINT}  - name: wide
    match: false
    overrides: {{model.intermediate_size: 200}}
match_active_params: {{reference: e4}}
seeds: [3, 5]
baseline: dense
""", cache=False)
    points = {point.name: point for point in plan_sweep(load_sweep(path))}
    assert list(points) == ["e4_s3", "e4_s5", "dense_s3", "dense_s5", "wide_s3", "wide_s5"]
    assert points["dense_s5"].config.run.seed == 5 and points["dense_s5"].group == "dense"
    assert points["dense_s3"].config.model.intermediate_size != 64  # matched to e4
    assert points["wide_s3"].config.model.intermediate_size == 200  # match: false
    only = plan_sweep(load_sweep(path, ["seeds=7", "only=dense"]))
    assert [point.name for point in only][:2] == ["e4_s7", "dense_s7"]


def test_seed_summary_pairs_the_baseline_by_seed():
    from jetmoe.training.sweep import seed_summary, summary_table

    row = dict(params_total=10, params_active=5, imbalance=1.0, dead_fraction=0.0, moa_dead_fraction=0.0,
               moe_dead_fraction=0.0, tokens_per_sec=100.0)
    rows = [{**row, "point": point, "seed": seed, "val_loss": loss} for point, seed, loss in [
        ("dense", 1, 4.0), ("dense", 2, 3.0), ("moe", 1, 3.9), ("moe", 2, 2.8), ("moe", 3, 9.9)]]
    dense, moe = seed_summary(rows, baseline="dense")
    assert (dense["seeds"], dense["delta_mean"]) == (2, None)
    assert moe["seeds"] == 3 and moe["delta_mean"] == pytest.approx(-0.15)  # seed 3 has no dense run to pair with
    assert moe["delta_std"] == pytest.approx(0.0707107, rel=1e-5) and moe["val_loss_mean"] == pytest.approx(5.5333, rel=1e-4)
    assert "-0.1500 ± 0.0707" in summary_table([moe])


def test_an_upcycled_point_trains_from_its_source_run(tmp_path):
    path = write_tiny_sweep(tmp_path, f"""\
points:
{DENSE_POINT}  - name: upcycled
    upcycle: dense
    overrides: {{data.skip_batches: 4}}
baseline: dense
""")
    planned = {point.name: point for point in plan_sweep(load_sweep(path))}
    assert planned["upcycled"].config.model.upcycle_from is None  # its source has not run yet
    result = run_sweep(path)
    assert result.ran == ["dense", "upcycled"]
    upcycled = {point.name: point for point in plan_sweep(load_sweep(path))}["upcycled"]
    assert upcycled.config.model.upcycle_from == str(tmp_path / "out/dense/hf")
    assert [row["point"] for row in result.summary] == ["dense", "upcycled"]
    assert (tmp_path / "out/summary.md").is_file() and "Δ vs baseline" in format_table(result)
