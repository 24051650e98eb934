"""Mixtures: closed-form apportionment, the keyed window permutation, phases resolved against the schedule."""

import numpy as np
import pytest

from jetmoe.data.config import DataConfig, PhaseConfig, SourceConfig
from jetmoe.data.mixture import Apportionment, Mixture, Permutation, Phase, build_phases, phase_start_steps
from jetmoe.errors import ConfigError


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.2, 0.1], [3, 1, 0, 2, 5, 1, 1], [1.0], [0.001, 0.999]])
def test_apportionment_is_exact_at_every_prefix(weights):
    a = Apportionment(np.asarray(weights) / sum(weights))
    n = np.arange(0, 10_001)
    counts = a.counts(n)
    assert (counts.sum(axis=1) == n).all()
    assert (np.diff(counts, axis=0) >= 0).all()  # each slot goes to exactly one source
    expected = np.outer(n, np.asarray(weights) / sum(weights))
    depth = int(np.ceil(np.log2(max(2, len(weights)))))
    assert np.abs(counts - expected).max() <= depth / 2 + 1e-9
    source, before = a.assign(n[:-1])
    assert (counts[n[:-1], source] == before).all() and (counts[n[:-1] + 1, source] == before + 1).all()
    assert not np.isin(source, np.flatnonzero(np.asarray(weights) == 0)).any()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 97, 1024, 4099])
def test_permutation_is_a_bijection_that_depends_on_the_key(n):
    perm = Permutation(n, key=12345)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    if n > 20:
        assert (perm != np.arange(n)).mean() > 0.9
        assert (perm != Permutation(n, key=54321)(np.arange(n))).mean() > 0.9


def mixture(weights_by_phase, starts, num_windows=(50, 30, 20), global_batch=8, batches_per_step=1, seed=0):
    phases = [Phase(f"p{i}", s, tuple(np.asarray(w) / sum(w))) for i, (w, s) in enumerate(zip(weights_by_phase, starts))]
    return Mixture([f"s{i}" for i in range(len(num_windows))], list(num_windows), phases,
                   global_batch=global_batch, batches_per_step=batches_per_step, seed=seed)


def test_ranks_read_disjoint_windows_and_together_the_whole_batch():
    m = mixture([[5, 3, 2]], [0], global_batch=12)
    for batch in range(3):
        whole = list(zip(*m.windows(batch, 0, 12)))
        ranks = [list(zip(*m.windows(batch, r * 4, 4))) for r in range(3)]
        assert sum(ranks, []) == whole
    seen = [pair for b in range(8) for pair in zip(*m.windows(b, 0, 12))]  # 96 draws, sources of 50/30/20 windows
    firsts = {s: [w for src, w in seen if src == s] for s in range(3)}
    for s, windows in firsts.items():
        first_pass = windows[: m.num_windows[s]]
        assert len(set(first_pass)) == len(first_pass)  # no window repeats within a pass over its source


def test_batches_are_a_pure_function_of_the_batch_index():
    a, b = mixture([[1, 1, 1]], [0], seed=3), mixture([[1, 1, 1]], [0], seed=3)
    later = [b.windows(i, 0, 8) for i in (5, 2, 9)]  # asked in another order, on a fresh object
    for i, (source, window) in zip((5, 2, 9), later):
        assert np.array_equal(a.windows(i, 0, 8)[0], source) and np.array_equal(a.windows(i, 0, 8)[1], window)
    assert not np.array_equal(mixture([[1, 1, 1]], [0], seed=4).windows(0, 0, 8)[1], a.windows(0, 0, 8)[1])


def test_shares_are_within_a_percent_over_10000_windows_and_switch_exactly_at_the_phase():
    m = mixture([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], [0, 1250], num_windows=(700, 400, 90), global_batch=8)
    phase1 = m.shares(0, 1250)  # 10,000 windows
    assert phase1 == pytest.approx({"s0": 0.6, "s1": 0.3, "s2": 0.1}, abs=1e-3)
    first_batch_of_phase2 = m.windows(1250, 0, 8)[0]
    counts = np.bincount(first_batch_of_phase2, minlength=3)
    assert counts.tolist() == Apportionment([0.2, 0.2, 0.6]).counts([8])[0].tolist()
    assert m.shares(1250, 2500) == pytest.approx({"s0": 0.2, "s1": 0.2, "s2": 0.6}, abs=1e-3)
    summary = m.summary(1300)
    assert [p["name"] for p in summary["phases"]] == ["p0", "p1"] and summary["phases"][1]["windows"] == 400


def test_windows_continue_through_a_phase_switch_without_repeating_a_pass():
    m = mixture([[1, 1, 0.0001], [1, 1, 1]], [0, 3], num_windows=(40, 40, 40), global_batch=8)
    drawn = [pair for b in range(6) for pair in zip(*m.windows(b, 0, 8))]
    s0 = [w for s, w in drawn if s == 0]
    assert len(s0) == len(set(s0))  # source 0 continues its pass across the switch
    assert np.array_equal(m.drawn(6), np.bincount([s for s, _ in drawn], minlength=3))


def test_accumulated_batches_shift_the_phase_start():
    m = mixture([[1, 0, 0], [0, 1, 0]], [0, 2], batches_per_step=4)
    assert m.phase_of(7) == 0 and m.phase_of(8) == 1
    assert set(m.windows(7, 0, 8)[0]) == {0} and set(m.windows(8, 0, 8)[0]) == {1}


def two_sources(*phases) -> DataConfig:
    return DataConfig(sources={"web": SourceConfig(weight=3), "code": SourceConfig(weight=1)}, phases=list(phases))


def test_phase_starts_as_step_fraction_or_decay():
    cfg = two_sources(PhaseConfig(start=100, weights={"web": 1}), PhaseConfig(start=0.5, weights={"code": 1}),
                      PhaseConfig(start="decay", weights={"web": 1, "code": 1}, name="anneal"))
    assert phase_start_steps(cfg, max_steps=1000, decay_start=800) == [100, 500, 800]
    phases = build_phases(cfg, [100, 500, 800])
    assert [p.name for p in phases] == ["base", "phase1", "phase2", "anneal"]
    assert phases[0].weights == (0.75, 0.25) and phases[1].weights == (1.0, 0.0)


@pytest.mark.parametrize(("phases", "message"), [
    ([PhaseConfig(start=500, weights={"web": 1}), PhaseConfig(start=0.2, weights={"web": 1})],
     r"data.phases\[1\].start \(0.2 = step 200\) must come after data.phases\[0\] \(step 500\)"),
    ([PhaseConfig(start="decay", weights={"web": 1})], "'decay' needs optim.schedule 'wsd'"),
    ([PhaseConfig(start=1000, weights={"web": 1})], r"must be after step 0, before trainer.max_steps \(1000\)"),
])
def test_phases_out_of_order_or_range_are_named(phases, message):
    with pytest.raises(ConfigError, match=message):
        phase_start_steps(two_sources(*phases), max_steps=1000, decay_start=None)
