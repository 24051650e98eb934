"""Sweeps: one base experiment, many points, one results table.

A sweep YAML::

    base: default.yaml               # experiment every point starts from (relative to this file)
    sweep_dir: runs/ablate_experts   # each point runs in <sweep_dir>/<point name>/ (relative to the working dir)
    overrides:                       # applied to every point: a mapping or a list of key=value
      trainer.max_steps: 1000
    grid:                            # cartesian product, points named e8_k2 ...; top-k > experts is skipped
      model.num_local_experts: [2, 4, 8]
      model.num_experts_per_tok: [1, 2]
    points:                          # named points, after the grid ones
      - name: dense
        overrides: {model.num_local_experts: 1, model.num_experts_per_tok: 1}
      - name: upcycled               # `upcycle`: starts from an earlier point's finished run (same seed)
        upcycle: dense               #   (model.upcycle_from=<its run directory>)
        match: false                 # `match: false`: keeps its own model.intermediate_size
        overrides: {model.num_local_experts: 8}
    match_active_params:             # optional: size model.intermediate_size per point (jetmoe.training.matching)
      reference: e8_k2               # a point (keeps its size); omitted: the base experiment with `overrides`
      tolerance: 0.02                # largest allowed |active / reference - 1|
      multiple_of: 8
    seeds: [1337, 2024, 7]           # optional: every point once per seed, named <point>_s<seed> (run.seed=<seed>)
    baseline: dense                  # optional: the summary's Δ column, paired by seed

A point's config is, later winning: the base experiment < ``overrides`` < the point's values <
command-line overrides < ``run.seed`` (with ``seeds``) < the matched ``model.intermediate_size`` <
``model.upcycle_from`` (with ``upcycle``) < ``run.output_dir=<sweep_dir>``, ``run.name=<point>``. Command-line
overrides named like sweep keys change the sweep itself: ``sweep_dir=DIR``, ``only=a,b`` (train just these points
now: names with or without their seed suffix), ``seeds=1,2``.

With ``seeds`` or ``baseline``, ``summary.csv`` and ``summary.md`` hold one row per point over its seeds: mean and
standard deviation of the validation loss, the difference to the baseline's validation loss at the same seed (mean
and standard deviation over the seeds), and mean routing statistics and throughput.

Points train one after another in this process: a Lightning run leaves nothing behind that changes
the next one (a point trained after others gives bit-identical metrics to a fresh process). A point
whose ``metrics.json`` exists is skipped, one with ``checkpoints/last.ckpt`` and no metrics resumes;
a run directory written with a different config is an error, never silently mixed in. The results
cover every finished point: ``results.csv``, ``results.md`` and ``val_loss_vs_experts.png``.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from jetmoe.training.config import (
    CLI_SOURCE,
    GROUPS,
    RUN_CONFIG,
    ConfigError,
    ExperimentConfig,
    build_model_config,
    display_path,
    load_config,
    read_yaml,
    to_dict,
)
from jetmoe.training.matching import DEFAULT_MULTIPLE_OF, matched_intermediate_size, relative_gap

log = logging.getLogger("jetmoe.sweep")

FILE_KEYS = ("base", "sweep_dir", "overrides", "grid", "points", "match_active_params", "seeds", "baseline")
CLI_KEYS = ("sweep_dir", "only", "seeds")  # command-line overrides that change the sweep rather than every point
MATCH_KEYS = ("reference", "tolerance", "multiple_of")
POINT_KEYS = ("name", "overrides", "match", "upcycle")
RESERVED = ("run.output_dir", "run.name")  # set by the sweep for every point
MATCHED = "model.intermediate_size"
NAME_PARTS = {"num_local_experts": "e", "num_experts_per_tok": "k"}  # grid point names: e8_k2
RESULTS_CSV, RESULTS_MD, RESULTS_PNG = "results.csv", "results.md", "val_loss_vs_experts.png"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
UPCYCLE_FROM = "model.upcycle_from"
METRICS_JSON, UTILIZATION_JSON = "metrics.json", "expert_utilization.json"

#: results.csv columns and their types (``read_results`` converts back; empty cells are None).
COLUMNS: dict[str, type] = {
    "name": str, "point": str, "seed": int, "overrides": str, "num_local_experts": int, "num_experts_per_tok": int, "intermediate_size": int,
    "params_total": int, "params_active": int, "tokens": int, "train_loss": float, "val_loss": float,
    "val_ppl": float, "tokens_per_sec": float, "imbalance": float, "dead_fraction": float,
    "moa_imbalance": float, "moe_imbalance": float, "moa_dead_fraction": float, "moe_dead_fraction": float,
    "wall_time_s": float, "run_dir": str,
}


@dataclass(frozen=True)
class MatchSpec:
    """``match_active_params``: every point's active parameter count within ``tolerance`` of the reference's."""

    reference: str | None = None  # a point name; None: the base experiment (with the shared overrides)
    tolerance: float = 0.02
    multiple_of: int = DEFAULT_MULTIPLE_OF


@dataclass(frozen=True)
class PointSpec:
    """A point of a sweep file, before seeds and matching."""

    name: str
    overrides: tuple[str, ...]  # its own dotlist
    matched: bool = True  # sized by match_active_params (`match: false`: keeps its own width)
    upcycle: str | None = None  # an earlier point whose finished run (same seed) this one is upcycled from


@dataclass(frozen=True)
class SweepSpec:
    """A parsed and checked sweep file (plus command-line overrides)."""

    path: Path
    base: Path
    sweep_dir: Path
    overrides: tuple[str, ...]  # shared, then command line: the dotlist every point gets
    points: tuple[PointSpec, ...]
    match: MatchSpec | None
    only: tuple[str, ...]  # points to train now; empty: all
    base_config: ExperimentConfig  # the base experiment with `overrides`
    seeds: tuple[int, ...] = ()  # every point once per seed; empty: once, with the base config's seed
    baseline: str | None = None  # the point the summary's differences are taken to

    def point(self, name: str) -> PointSpec:
        return next(point for point in self.points if point.name == name)


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: tuple[str, ...]  # the point's own dotlist, its seed and matched intermediate_size included
    config: ExperimentConfig
    group: str = ""  # the sweep file's point (its name without the seed suffix)
    seed: int | None = None
    source: "SweepPoint | None" = None  # the point this one is upcycled from

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.output_dir) / self.config.run.name

    @property
    def finished(self) -> bool:
        return (self.run_dir / METRICS_JSON).is_file()

    @property
    def params(self) -> dict[str, int]:
        return build_model_config(self.config.model).num_parameters()

    @property
    def upcycled(self) -> bool:
        """Whether the config names its source's run (only possible once that run has finished)."""
        return self.config.model.upcycle_from is not None


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]]  # one per finished point, keys: COLUMNS
    ran: list[str]
    skipped: list[str]  # finished before this call
    csv_path: Path
    md_path: Path
    plot_path: Path | None  # None without matplotlib
    summary: list[dict[str, Any]] | None = None  # with seeds or a baseline: one row per point over its seeds


# ----------------------------------------------------------------------------- sweep file


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Parse and check a sweep YAML; ConfigError (one line naming the file and key) when it is wrong."""
    path = Path(path)
    source = display_path(path)
    raw = read_yaml(path)
    unknown = [key for key in raw if key not in FILE_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (sweep keys: {', '.join(FILE_KEYS)})")
    sweep_cli, point_cli = _split_cli(overrides)
    base = _base_path(raw, path, source)
    shared = _dotlist(raw.get("overrides"), f"{source}: overrides")
    base_config = _base_config(base, shared, point_cli, source)
    points = _points(raw, base_config, source)
    names = [point.name for point in points]
    match = _match_spec(raw.get("match_active_params"), names, source)
    named = [(f"{source}: overrides", shared, match is not None), (CLI_SOURCE, point_cli, match is not None)]
    for where, dotlist, matching in [
        *named, *((f"{source}: point {p.name}", p.overrides, match is not None and p.matched) for p in points)
    ]:
        _check_keys(dotlist, matching, where)
    seeds = _seeds(sweep_cli["seeds"].split(",") if "seeds" in sweep_cli else raw.get("seeds"),
                   CLI_SOURCE if "seeds" in sweep_cli else source)
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in names:
        raise ConfigError(f"{source}: baseline: no point named {baseline!r} (points: {', '.join(names)})")
    only = tuple(filter(None, sweep_cli.get("only", "").split(",")))
    known = {*names, *(f"{name}_s{seed}" for name in names for seed in seeds)}
    missing = [name for name in only if name not in known]
    if missing:
        raise ConfigError(f"{CLI_SOURCE}: only: no point named {missing[0]!r} (points: {', '.join(names)})")
    return SweepSpec(
        path=path,
        base=base,
        sweep_dir=Path(sweep_cli.get("sweep_dir") or _sweep_dir(raw, path, source)),
        overrides=(*shared, *point_cli),
        points=tuple(points),
        match=match,
        only=only,
        base_config=base_config,
        seeds=seeds,
        baseline=baseline,
    )


def _seeds(raw: Any, source: str) -> tuple[int, ...]:
    """``seeds``: a non-empty list of distinct integers (from the command line: ``seeds=1,2,3``), or none."""
    if raw is None:
        return ()
    try:
        seeds = tuple(int(seed) for seed in raw) if isinstance(raw, list) and raw else None
    except (TypeError, ValueError):
        seeds = None
    if seeds is None or any(isinstance(seed, bool) for seed in raw) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list of distinct integers, got {raw!r}")
    return seeds


def _split_cli(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides -> (sweep-level settings, the dotlist for every point)."""
    sweep, points = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in CLI_KEYS:
            sweep[key] = value
        else:
            points.append(item)
    return sweep, points


def _base_path(raw: Mapping[str, Any], path: Path, source: str) -> Path:
    if not isinstance(raw.get("base"), str):
        raise ConfigError(
            f"{source}: base must name the experiment YAML the points start from, got {raw.get('base')!r}"
        )
    base = path.parent / raw["base"]
    if not base.is_file():
        raise ConfigError(f"{source}: base: {display_path(base)} not found")
    return base


def _sweep_dir(raw: Mapping[str, Any], path: Path, source: str) -> str:
    value = raw.get("sweep_dir", f"runs/{path.stem}")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: sweep_dir must be a directory path, got {value!r}")
    return value


def _base_config(base: Path, shared: list[str], cli: list[str], source: str) -> ExperimentConfig:
    """The base experiment with the shared overrides (errors blamed on the sweep file), then the command line."""
    try:
        load_config(base, shared)
    except ConfigError as err:
        raise ConfigError(f"{source}: overrides: {_strip_cli(err)}") from None
    return load_config(base, [*shared, *cli])


def _points(raw: Mapping[str, Any], base_config: ExperimentConfig, source: str) -> list[PointSpec]:
    if "grid" not in raw and "points" not in raw:
        raise ConfigError(f"{source}: needs a 'grid' (key: [values]) or 'points' (list of name + overrides)")
    points = [*_grid_points(raw.get("grid"), base_config, source), *_named_points(raw.get("points"), source)]
    names = [point.name for point in points]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise ConfigError(f"{source}: two points are named {duplicate!r}")
    if not points:
        raise ConfigError(f"{source}: grid: every combination has num_experts_per_tok > num_local_experts")
    for i, point in enumerate(points):
        if point.upcycle is not None and point.upcycle not in names[:i]:
            raise ConfigError(f"{source}: point {point.name}: upcycle must name an earlier point, got {point.upcycle!r}")
    return points


def _grid_points(grid: Any, base_config: ExperimentConfig, source: str) -> Iterable[PointSpec]:
    """Cartesian product in file order; combinations with top-k > experts are left out."""
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: grid must be a mapping of key: [values], got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{key} must be a non-empty list of values, got {values!r}")
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        if _topk_exceeds_experts(values, base_config):
            continue
        points.append(PointSpec(_point_name(values), tuple(_dotlist(values, f"{source}: grid"))))
    return points


def _point_name(values: Mapping[str, Any]) -> str:
    """``{model.num_local_experts: 8, model.num_experts_per_tok: 2}`` -> ``e8_k2``; other keys by their last part."""
    parts = []
    for key, value in values.items():
        leaf = key.rpartition(".")[2]
        parts.append(f"{NAME_PARTS.get(leaf, leaf)}{value}")
    return "_".join(parts)


def _topk_exceeds_experts(values: Mapping[str, Any], base_config: ExperimentConfig) -> bool:
    m = base_config.model
    experts = values.get("model.num_local_experts", m.num_local_experts)
    top_k = values.get("model.num_experts_per_tok", m.num_experts_per_tok)
    return isinstance(experts, int) and isinstance(top_k, int) and top_k > experts


def _named_points(entries: Any, source: str) -> list[PointSpec]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: points must be a list of {{name: ..., overrides: {{key: value}}}}")
    points = []
    for i, entry in enumerate(entries):
        where = f"{source}: points[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"{where}: needs a 'name' (and 'overrides'), got {entry!r}")
        unknown = [key for key in entry if key not in POINT_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}' (a point has: {', '.join(POINT_KEYS)})")
        if not isinstance(entry.get("match", True), bool):
            raise ConfigError(f"{where}.match must be true or false, got {entry['match']!r}")
        if not isinstance(entry.get("upcycle", ""), str):
            raise ConfigError(f"{where}.upcycle must name an earlier point, got {entry['upcycle']!r}")
        overrides = tuple(_dotlist(entry.get("overrides"), f"{where}.overrides"))
        if entry.get("upcycle") and any(item.startswith(f"{UPCYCLE_FROM}=") for item in overrides):
            raise ConfigError(f"{where}: {UPCYCLE_FROM} is set by upcycle: {entry['upcycle']}; drop one of them")
        points.append(PointSpec(entry["name"], overrides, entry.get("match", True), entry.get("upcycle") or None))
    return points


def _match_spec(raw: Any, names: list[str], source: str) -> MatchSpec | None:
    if raw in (None, False):
        return None
    if raw is True:
        return MatchSpec()
    where = f"{source}: match_active_params"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be true/false or a mapping of {', '.join(MATCH_KEYS)}, got {raw!r}")
    unknown = [key for key in raw if key not in MATCH_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (choose from {', '.join(MATCH_KEYS)})")
    spec = MatchSpec(**raw)
    if spec.reference is not None and spec.reference not in names:
        raise ConfigError(f"{where}.reference: no point named {spec.reference!r} (points: {', '.join(names)})")
    if isinstance(spec.tolerance, bool) or not isinstance(spec.tolerance, (int, float)) or not 0 < spec.tolerance < 1:
        raise ConfigError(f"{where}.tolerance must be a number in (0, 1), got {spec.tolerance!r}")
    if isinstance(spec.multiple_of, bool) or not isinstance(spec.multiple_of, int) or spec.multiple_of < 1:
        raise ConfigError(f"{where}.multiple_of must be a positive integer, got {spec.multiple_of!r}")
    return spec


def _check_keys(dotlist: Sequence[str], matching: bool, where: str) -> None:
    for item in dotlist:
        key = item.partition("=")[0]
        if key in RESERVED:
            raise ConfigError(f"{where}: {key} is set by the sweep (<sweep_dir>/<point name>); set sweep_dir instead")
        if matching and key == MATCHED:
            raise ConfigError(f"{where}: {key} is chosen by match_active_params; drop it or disable matching")


def _dotlist(overrides: Any, where: str) -> list[str]:
    """A mapping (nested or dotted keys) or a list of key=value strings -> ``key=value`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, list):
        bad = next((item for item in overrides if not isinstance(item, str) or "=" not in item), None)
        if bad is not None:
            raise ConfigError(f"{where}: {bad!r} is not a key=value string")
        return list(overrides)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping of key: value or a list of key=value, got {overrides!r}")
    return [f"{key}={_format_value(key, value)}" for key, value in _flatten(overrides)]


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _format_value(key: str, value: Any) -> str:
    """A value as an omegaconf dotlist parses it back (JSON is YAML); a group swap (model=tiny) stays bare."""
    return str(value) if key in GROUPS else json.dumps(value)


def _strip_cli(err: ConfigError) -> str:
    """load_config blames dotlist overrides on the command line; sweeps name their own source instead."""
    return str(err).removeprefix(f"{CLI_SOURCE}: ")


# ----------------------------------------------------------------------------- planning


def plan_sweep(spec: SweepSpec) -> list[SweepPoint]:
    """Every point's composed config, once per seed, active-parameter matched if the sweep asks for it (no
    training). An upcycled point names its source's run only once that run has finished (`replan_upcycled`)."""
    target = _reference_active(spec) if spec.match else None
    planned: dict[tuple[str, int | None], SweepPoint] = {}
    for point in spec.points:
        for seed in spec.seeds or (None,):
            name = point.name if seed is None else f"{point.name}_s{seed}"
            dotlist = point.overrides if seed is None else (*point.overrides, f"run.seed={seed}")
            source = planned[point.upcycle, seed] if point.upcycle else None
            matched = _plan_point(spec, name, dotlist, target if point.matched else None, point.name)
            planned[point.name, seed] = SweepPoint(name, matched.overrides, matched.config, point.name, seed, source)
            if source is not None and source.finished:
                planned[point.name, seed] = replan_upcycled(spec, planned[point.name, seed])
    return list(planned.values())


def replan_upcycled(spec: SweepSpec, point: SweepPoint) -> SweepPoint:
    """An upcycled point's config naming its (finished) source's run directory."""
    overrides = (*point.overrides, f"{UPCYCLE_FROM}={point.source.run_dir}")
    return SweepPoint(point.name, overrides, _compose(spec, point.name, overrides), point.group, point.seed,
                      point.source)


def _compose(spec: SweepSpec, name: str, dotlist: Sequence[str]) -> ExperimentConfig:
    run = (f"run.output_dir={spec.sweep_dir}", f"run.name={name}")
    try:
        return load_config(spec.base, [*spec.overrides, *dotlist, *run])
    except ConfigError as err:
        raise ConfigError(f"{display_path(spec.path)}: point {name}: {_strip_cli(err)}") from None


def _reference_active(spec: SweepSpec) -> int:
    if spec.match.reference is None:
        return build_model_config(spec.base_config.model).num_parameters()["active"]
    dotlist = spec.point(spec.match.reference).overrides
    return build_model_config(_compose(spec, spec.match.reference, dotlist).model).num_parameters()["active"]


def _plan_point(
    spec: SweepSpec, name: str, dotlist: tuple[str, ...], target: int | None, group: str
) -> SweepPoint:
    config = _compose(spec, name, dotlist)
    if target is None or group == spec.match.reference:
        return SweepPoint(name, dotlist, config)
    size = matched_intermediate_size(build_model_config(config.model), target, spec.match.multiple_of)
    matched = (*dotlist, f"{MATCHED}={size}")
    point = SweepPoint(name, matched, _compose(spec, name, matched))
    gap = relative_gap(point.params["active"], target)
    if abs(gap) > spec.match.tolerance:
        raise ConfigError(
            f"{display_path(spec.path)}: match_active_params: point {name} gets {point.params['active']:,} active "
            f"parameters at {MATCHED}={size}, {gap:+.1%} off the reference's {target:,} "
            f"(tolerance {spec.match.tolerance:.0%})"
        )
    return point


def format_plan(points: Sequence[SweepPoint]) -> str:
    """One line per point: name, total / active parameters, its overrides (a dry run's output)."""
    width = max(len(point.name) for point in points)
    lines = []
    for point in points:
        params = point.params
        lines.append(f"{point.name:<{width}}  total {_millions(params['total']):>7}  "
                     f"active {_millions(params['active']):>7}  {' '.join(point.overrides)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def run_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepResult:
    """Train every unfinished point (in order, in this process), then write the results files."""
    from jetmoe.training.run import CHECKPOINTS, LAST_CKPT, train  # Lightning: only when something trains

    spec = load_sweep(path, overrides)
    points = plan_sweep(spec)
    for point in points:  # all of them before anything trains
        _check_run_dir(point)
    ran, skipped = [], []
    for i, point in enumerate(points, 1):
        if point.finished:
            skipped.append(point.name)
            log.info("[%d/%d] %s: finished earlier, skipped", i, len(points), point.name)
        elif not spec.only or point.name in spec.only or point.group in spec.only:
            if point.source is not None and not point.upcycled:
                if not point.source.finished:
                    log.info("[%d/%d] %s: waits for %s", i, len(points), point.name, point.source.name)
                    continue
                point = points[i - 1] = replan_upcycled(spec, point)
            resume = (point.run_dir / CHECKPOINTS / LAST_CKPT).is_file()
            log.info("[%d/%d] %s: %s (%s)", i, len(points), point.name, "resuming" if resume else "training",
                     " ".join(point.overrides) or "base")
            train(point.config, resume=resume)
            ran.append(point.name)
    rows = [result_row(point) for point in points if point.finished]
    files = write_results(spec.sweep_dir, rows)
    summary = None
    if spec.seeds or spec.baseline:
        summary = seed_summary(rows, spec.baseline)
        write_summary(spec.sweep_dir, summary)
    return SweepResult(spec.sweep_dir, rows, ran, skipped, *files, summary=summary)


def _check_run_dir(point: SweepPoint) -> None:
    """A run directory must hold this point's config: a changed sweep must not be mixed with old runs.
    Keys only one side has (a config field added or removed by a code change) are not compared."""
    config_file = point.run_dir / RUN_CONFIG
    if not config_file.is_file():
        return
    old = dict(_flatten(read_yaml(config_file)))
    new = dict(_flatten(to_dict(point.config)))
    changed = next((key for key in sorted(old.keys() & new.keys()) if old[key] != new[key]), None)
    if changed:
        raise ConfigError(
            f"{point.run_dir} holds a run with {changed}={old[changed]!r}, point {point.name} now has "
            f"{new[changed]!r}: delete that directory or choose another sweep_dir"
        )



# ----------------------------------------------------------------------------- results


def result_row(point: SweepPoint) -> dict[str, Any]:
    """The results.csv row of a finished point, from its metrics.json and expert_utilization.json."""
    metrics = json.loads((point.run_dir / METRICS_JSON).read_text())
    m = point.config.model
    return {
        "name": point.name,
        "point": point.group or point.name,
        "seed": point.config.run.seed,
        "overrides": " ".join(point.overrides),
        "num_local_experts": m.num_local_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "intermediate_size": m.intermediate_size,
        "params_total": metrics["params_total"],
        "params_active": metrics["params_active"],
        "tokens": metrics["tokens_seen"],
        "train_loss": metrics["train_loss"],
        "val_loss": metrics["val_loss"],
        "val_ppl": metrics["val_ppl"],
        "tokens_per_sec": metrics["tokens_per_sec"],
        **routing_summary(point.run_dir),
        "wall_time_s": metrics["wall_time_s"],
        "run_dir": str(point.run_dir),
    }


def routing_summary(run_dir: Path) -> dict[str, float | None]:
    """Mean load imbalance and dead-expert fraction over the routers (all, MoA, MoE) of the final
    validation (the whole training run if the run never validated)."""
    path = run_dir / UTILIZATION_JSON
    if not path.is_file():
        return {key: None for key in COLUMNS if key.endswith(("imbalance", "dead_fraction"))}
    report = json.loads(path.read_text())
    scope = "val" if "val" in report["scopes"] else "run"
    summary = {}
    for prefix, kinds in (("", ("moa", "moe")), ("moa_", ("moa",)), ("moe_", ("moe",))):
        routers = [router[scope] for router in report["routers"] if router["kind"] in kinds]
        for key in ("imbalance", "dead_fraction"):
            summary[prefix + key] = sum(router[key] for router in routers) / len(routers)
    return summary


def write_results(sweep_dir: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path, Path | None]:
    """``results.csv``, ``results.md`` and (with matplotlib) ``val_loss_vs_experts.png`` in ``sweep_dir``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = sweep_dir / RESULTS_CSV, sweep_dir / RESULTS_MD
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(f"# Sweep {sweep_dir.name}\n\n{markdown_table(rows)}\n")
    if not rows:
        return csv_path, md_path, None
    try:
        plot_results(rows, sweep_dir / RESULTS_PNG)
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'jetmoe[notebooks]')", RESULTS_PNG)
        return csv_path, md_path, None
    return csv_path, md_path, sweep_dir / RESULTS_PNG


#: summary.csv columns: per point over its seeds (std: sample standard deviation, None for one seed).
SUMMARY_COLUMNS = (
    "point", "seeds", "params_total", "params_active", "val_loss_mean", "val_loss_std", "delta_mean", "delta_std",
    "imbalance", "dead_fraction", "moa_dead_fraction", "moe_dead_fraction", "tokens_per_sec",
)


def seed_summary(rows: Sequence[Mapping[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per point (its ``point`` column) over its seeds: mean and standard deviation of the validation loss
    and of its difference to ``baseline``'s at the same seed (seeds the baseline lacks are left out of the
    difference), and the mean routing statistics and throughput."""
    base = {row["seed"]: row["val_loss"] for row in rows if row["point"] == baseline}
    summary = []
    for point in dict.fromkeys(row["point"] for row in rows):
        group = [row for row in rows if row["point"] == point and row["val_loss"] is not None]
        deltas = [row["val_loss"] - base[row["seed"]] for row in group if row["seed"] in base]
        entry = {"point": point, "seeds": len(group), "params_total": group[0]["params_total"] if group else None,
                 "params_active": group[0]["params_active"] if group else None}
        entry["val_loss_mean"], entry["val_loss_std"] = _mean_std([row["val_loss"] for row in group])
        entry["delta_mean"], entry["delta_std"] = _mean_std(deltas) if baseline and point != baseline else (None, None)
        for key in ("imbalance", "dead_fraction", "moa_dead_fraction", "moe_dead_fraction", "tokens_per_sec"):
            entry[key] = _mean_std([row[key] for row in group if row[key] is not None])[0]
        summary.append(entry)
    return summary


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5


def write_summary(sweep_dir: Path, summary: Sequence[Mapping[str, Any]]) -> None:
    """``summary.csv`` and ``summary.md`` in ``sweep_dir``."""
    with open(sweep_dir / SUMMARY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        writer.writerows(summary)
    (sweep_dir / SUMMARY_MD).write_text(f"# Sweep {sweep_dir.name}: over seeds\n\n{summary_table(summary)}\n")


def summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as Markdown: val loss and Δ as mean ± std."""
    def pm(mean: float | None, std: float | None, signed: bool = False) -> str:
        if mean is None:
            return "–"
        text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
        return text if std is None else f"{text} ± {std:.4f}"

    lines = ["| point | seeds | total | active | val loss | Δ vs baseline | imbalance | dead | tokens/s |",
             "|" + "---|" * 9]
    for row in summary:
        cells = [row["point"], str(row["seeds"]), _cell(row["params_total"], "M", ""),
                 _cell(row["params_active"], "M", ""), pm(row["val_loss_mean"], row["val_loss_std"]),
                 pm(row["delta_mean"], row["delta_std"], signed=True), _cell(row["imbalance"], "{:.2f}", ""),
                 _cell(row["dead_fraction"], "{:.2f}", ""), _cell(row["tokens_per_sec"], "{:,.0f}", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<sweep_dir>/results.csv`` with their COLUMNS types (empty cells: None)."""
    with open(Path(sweep_dir) / RESULTS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{key: None if value == "" else COLUMNS[key](value) for key, value in row.items()} for row in rows]


# ----------------------------------------------------------------------------- tables and plots

_TABLE: tuple[tuple[str, str, str], ...] = (  # header, column, format
    ("point", "name", "{}"),
    ("overrides", "overrides", "{}"),
    ("total", "params_total", "M"),
    ("active", "params_active", "M"),
    ("tokens", "tokens", "{:,}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("val ppl", "val_ppl", "{:.2f}"),
    ("tokens/s", "tokens_per_sec", "{:,.0f}"),
    ("imbalance", "imbalance", "{:.2f}"),
    ("dead", "dead_fraction", "{:.2f}"),
    ("wall", "wall_time_s", "{:.0f}s"),
)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One row per point; overrides shown by their last key part (``num_local_experts=8``)."""
    lines = ["| " + " | ".join(header for header, _, _ in _TABLE) + " |", "|" + "---|" * len(_TABLE)]
    for row in rows:
        cells = [_cell(row[key], spec, key) for _, key, spec in _TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any, spec: str, key: str) -> str:
    if value is None:
        return "n/a"
    if key == "overrides":
        return " ".join(_leaf_override(item) for item in value.split())
    return _millions(value) if spec == "M" else spec.format(value)


def _leaf_override(item: str) -> str:
    """``model.num_local_experts=8`` -> ``num_local_experts=8``."""
    key, _, value = item.partition("=")
    return f"{key.rpartition('.')[2]}={value}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_table(result: SweepResult) -> str:
    """What ``jetmoe sweep`` prints: the results table, what ran, and where the files are."""
    files = [result.csv_path, result.md_path] + ([result.plot_path] if result.plot_path else [])
    if result.summary is not None:
        files += [result.sweep_dir / SUMMARY_CSV, result.sweep_dir / SUMMARY_MD]
    summary = "" if result.summary is None else f"{summary_table(result.summary)}\n\n"
    return (
        f"{markdown_table(result.rows)}\n\n{summary}"
        f"sweep dir {result.sweep_dir}: trained {len(result.ran)}, skipped {len(result.skipped)} finished point(s)\n"
        f"results   {', '.join(str(path) for path in files)}"
    )


def plot_results(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None):
    """Validation loss vs experts per layer, total and active parameters: one line per top-k (MoA and MoE
    share both) and per variant (a point's other overrides, e.g. ``aux_loss_per_router=false``), the dense
    point (one expert) a star and a dashed line. Saved to ``path`` if given; returns the matplotlib Figure.
    Needs matplotlib (imported here, not by the package)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(15, 5.5), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    done = [row for row in rows if row["val_loss"] is not None]
    mixtures = [row for row in done if row["num_local_experts"] > 1]
    groups: dict[str, list[Mapping[str, Any]]] = {}  # a point's runs, one per seed
    for row in done:
        groups.setdefault(row.get("point") or row["name"], []).append(row)
    for ax, key in zip(axes, ("num_local_experts", "params_total", "params_active")):
        for top_k, variant in sorted({(row["num_experts_per_tok"], _variant(row)) for row in mixtures}):
            line = sorted((row for row in mixtures if (row["num_experts_per_tok"], _variant(row)) == (top_k, variant)),
                          key=lambda row: row[key])
            style = "o" if key == "params_active" else "o-"  # matched active counts: a scatter
            label = f"MoA+MoE top-{top_k}" + (f", {variant}" if variant else "")
            ax.plot([row[key] for row in line], [row["val_loss"] for row in line], style, label=label)
        for group, runs in groups.items():
            for run in runs if runs[0]["num_local_experts"] == 1 else ():  # the legend names each dense point once
                label = f"dense ({group})" if run is runs[0] else None
                ax.plot(run[key], run["val_loss"], "k*", markersize=14, label=label)
                ax.axhline(run["val_loss"], color="k", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    experts_ax, total_ax, active_ax = axes
    experts_ax.set_xscale("log", base=2)
    _ticks_at(experts_ax, [row["num_local_experts"] for row in done], str)
    total_ax.set_xscale("log")
    _ticks_at(total_ax, [row["params_total"] for row in done], _millions)
    active_ax.xaxis.set_major_locator(MaxNLocator(4))
    active_ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:.4g}M"))
    for group, runs in groups.items():  # one label per point, at its seeds' mean
        mean_loss = sum(row["val_loss"] for row in runs) / len(runs)
        active_ax.annotate(group, (runs[0]["params_active"], mean_loss), fontsize=8, xytext=(4, 2),
                           textcoords="offset points")
    experts_ax.set(xlabel="experts per layer (MoA and MoE)", ylabel="final validation loss")
    total_ax.set_xlabel("total parameters")
    active_ax.set_xlabel("active parameters per token")
    fig.legend(*experts_ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


_LINE_KEYS = ("num_local_experts", "num_experts_per_tok", "intermediate_size")  # what varies along a line
_RUN_KEYS = ("seed", "upcycle_from", "skip_batches")  # which run a point is, not which model


def _variant(row: Mapping[str, Any]) -> str:
    """A point's overrides besides expert counts, the matched width and the run plumbing, short keys: '' for plain
    grid points."""
    items = (item.split("=", 1) for item in (row.get("overrides") or "").split())
    short = ((key.rpartition(".")[2], value) for key, value in items)
    return " ".join(f"{key}={value}" for key, value in short if key not in _LINE_KEYS + _RUN_KEYS)


def _ticks_at(ax, values: Sequence[float], label) -> None:
    """Major ticks at the data's x values (one per distinct label), no minor ticks."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({label(value): value for value in sorted(values)}.values())
    ax.set_xticks(ticks, [label(value) for value in ticks], rotation=45 if len(ticks) > 4 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
