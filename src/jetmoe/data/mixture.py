"""Weighted mixtures of sources and their phases, as pure functions of the batch index.

Which window fills slot k of the run (slots numbered across batches and ranks: batch b, rank r, row i is slot
``(b * world_size + r) * batch_size + i``) is computed, never drawn from a stateful generator:

* Source: within a phase, slots are dealt to sources by a closed-form apportionment (`Apportionment`, after
  Megatron's blended datasets, which pick the source furthest behind its weight): after n slots every source
  has its weight's share of n to within a window per level of a binary tree over the sources. So shares are exact
  at every prefix and at a phase switch, not merely in expectation.
* Window: the c-th window drawn from a source (c counted over all phases) is window ``P_e(c mod N)`` of its N
  windows, where ``P_e`` is a keyed pseudo-random permutation of [0, N) for pass e = c // N (`Permutation`, a
  Feistel network with cycle walking: O(1) memory for any N, unlike a stored permutation).

The data order is thus a function of (seed, sources, phases, batch index): resuming needs only the number of
batches consumed, ranks read disjoint windows without talking to each other, and any step's batch can be rebuilt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from jetmoe.data.config import DECAY, DataConfig, phase_name
from jetmoe.errors import ConfigError

FEISTEL_ROUNDS = 6


@dataclass(frozen=True)
class Phase:
    """A mixture from optimizer step `start_step` on: `weights` over the sources, normalized."""

    name: str
    start_step: int
    weights: tuple[float, ...]


def phase_start_steps(cfg: DataConfig, *, max_steps: Optional[int] = None,
                      decay_start: Optional[int] = None) -> list[int]:
    """The optimizer step at which each of `cfg.phases` starts; ConfigError when out of order or out of range.

    ``start`` is an int step, a float fraction of `max_steps`, or "decay" (`decay_start`: the WSD decay's first
    step, None for a schedule without one).
    """
    steps = []
    for i, phase in enumerate(cfg.phases):
        key = f"data.phases[{i}].start"
        if phase.start == DECAY:
            if decay_start is None:
                raise ConfigError(f"{key} 'decay' needs optim.schedule 'wsd' with optim.decay_fraction > 0")
            step = decay_start
        elif isinstance(phase.start, float):
            if max_steps is None:
                raise ConfigError(f"{key} {phase.start} is a fraction of trainer.max_steps, which is not known here")
            step = int(phase.start * max_steps)
        else:
            step = int(phase.start)
        if steps and step <= steps[-1]:
            raise ConfigError(
                f"{key} ({phase.start!r} = step {step}) must come after data.phases[{i - 1}] (step {steps[-1]}): "
                "phases are listed in step order"
            )
        if step <= 0 or (max_steps is not None and step >= max_steps):
            bound = f", before trainer.max_steps ({max_steps})" if max_steps is not None else ""
            raise ConfigError(f"{key} ({phase.start!r} = step {step}) must be after step 0{bound}")
        steps.append(step)
    return steps


def build_phases(cfg: DataConfig, start_steps: Sequence[int]) -> list[Phase]:
    """The base mixture (the sources' weights, from step 0) followed by `cfg.phases`."""
    names = list(cfg.sources)
    phases = [Phase("base", 0, _normalized([cfg.sources[n].weight for n in names]))]
    for i, (phase, step) in enumerate(zip(cfg.phases, start_steps, strict=True)):
        phases.append(Phase(phase_name(i, phase), step, _normalized([phase.weights.get(n, 0.0) for n in names])))
    return phases


def _normalized(weights: Sequence[float]) -> tuple[float, ...]:
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


class Apportionment:
    """Deals slots 0, 1, 2, ... to sources in proportion to `weights`, in closed form.

    A binary tree over the sources: a node that has received n slots has given floor(p n + 1/2) of them to its
    left subtree (p: the left subtree's share), the rest to its right. Each level is off by at most half a window,
    so after n slots a source holds its share of n to within ceil(log2 S) / 2 windows.
    """

    def __init__(self, weights: Sequence[float]):
        self.num_sources = len(weights)
        self._nodes: list[tuple[int, int, int, float]] = []  # (lo, mid, hi, share of [lo, mid))
        self._build(np.asarray(weights, dtype=np.float64), 0, len(weights))

    def _build(self, w: np.ndarray, lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        mid = (lo + hi) // 2
        total = w[lo:hi].sum()
        self._nodes.append((lo, mid, hi, float(w[lo:mid].sum() / total) if total > 0 else 0.0))
        self._build(w, lo, mid)
        self._build(w, mid, hi)

    def counts(self, n: np.ndarray) -> np.ndarray:
        """[len(n), S] int64: how many of the first n slots went to each source."""
        n = np.asarray(n, dtype=np.int64)
        out = np.zeros((len(n), self.num_sources), dtype=np.int64)
        reached = {(0, self.num_sources): n}
        for lo, mid, hi, share in self._nodes:  # pre-order: a parent before its children
            total = reached.pop((lo, hi))
            left = np.floor(share * total + 0.5).astype(np.int64)
            reached[(lo, mid)], reached[(mid, hi)] = left, total - left
        for (lo, hi), count in reached.items():  # the leaves
            out[:, lo] = count
        return out

    def assign(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, how many slots that source had before it)."""
        before, after = self.counts(slots), self.counts(np.asarray(slots) + 1)
        source = np.argmax(after - before, axis=1)
        return source, before[np.arange(len(source)), source]


def _key(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random permutation of [0, n): a balanced Feistel network on the smallest even number of bits
    covering n, cycle-walked back into range (at most 4x the domain, so a few rounds of walking on average)."""

    def __init__(self, n: int, key: int):
        self.n = n
        half = max(1, (max(1, n - 1).bit_length() + 1) // 2)
        self.half, self.mask = np.uint64(half), np.uint64((1 << half) - 1)
        with np.errstate(over="ignore"):
            self.round_keys = _mix64(np.array([(key + r) % (1 << 64) for r in range(FEISTEL_ROUNDS)], dtype=np.uint64))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self._encrypt(x)
            outside = x >= np.uint64(self.n)
            while outside.any():
                x[outside] = self._encrypt(x[outside])
                outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class Mixture:
    """The windows of every batch of a run: phases over sources of `num_windows` windows each.

    `batch_start(p)` is the first loader batch of phase p (its optimizer step x `batches_per_step`).
    """

    def __init__(self, names: Sequence[str], num_windows: Sequence[int], phases: Sequence[Phase], *,
                 global_batch: int, batches_per_step: int, seed: int):
        self.names, self.num_windows = list(names), np.asarray(num_windows, dtype=np.int64)
        self.phases, self.global_batch = list(phases), global_batch
        self.batch_starts = np.array([p.start_step * batches_per_step for p in phases], dtype=np.int64)
        self.apportionments = [Apportionment(p.weights) for p in phases]
        self.seed = seed
        # windows drawn from each source before each phase starts
        self.drawn_before = np.zeros((len(phases), len(names)), dtype=np.int64)
        for p in range(1, len(phases)):
            slots = (self.batch_starts[p] - self.batch_starts[p - 1]) * global_batch
            self.drawn_before[p] = self.drawn_before[p - 1] + self.apportionments[p - 1].counts([slots])[0]
        self._permutations: dict[tuple[int, int], Permutation] = {}

    def phase_of(self, batch: int) -> int:
        return int(np.searchsorted(self.batch_starts, batch, side="right")) - 1

    def windows(self, batch: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) of slots [first, first + count) of `batch` (a rank's rows: first = rank x batch_size)."""
        p = self.phase_of(batch)
        slots = (batch - self.batch_starts[p]) * self.global_batch + first + np.arange(count, dtype=np.int64)
        source, before = self.apportionments[p].assign(slots)
        drawn = self.drawn_before[p][source] + before  # this source's windows drawn before, over all phases
        window = np.empty(count, dtype=np.int64)
        for s in np.unique(source):
            rows = source == s
            n = self.num_windows[s]
            passes, offsets = np.divmod(drawn[rows], n)
            for e in np.unique(passes):
                at = passes == e
                idx = np.flatnonzero(rows)[at]
                window[idx] = self._permutation(int(s), int(e))(offsets[at])
        return source, window

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[key] = Permutation(int(self.num_windows[source]),
                                                  _key(self.seed, self.names[source], epoch))
        return self._permutations[key]

    def drawn(self, batches: int) -> np.ndarray:
        """[S] windows drawn from each source by all ranks in the first `batches` batches."""
        p = self.phase_of(max(0, batches - 1)) if batches else 0
        slots = (batches - self.batch_starts[p]) * self.global_batch
        return self.drawn_before[p] + self.apportionments[p].counts([max(0, slots)])[0]

    def shares(self, start: int, end: int) -> dict[str, float]:
        """Each source's share of the windows of batches [start, end)."""
        counts = self.drawn(end) - self.drawn(start)
        total = max(1, int(counts.sum()))
        return {name: int(c) / total for name, c in zip(self.names, counts)}

    def summary(self, batches: int) -> dict[str, object]:
        """Realized shares over the first `batches` batches: overall and per phase reached (for metrics.json)."""
        phases = []
        for p, phase in enumerate(self.phases):
            start = int(self.batch_starts[p])
            if start >= batches:
                break
            end = int(self.batch_starts[p + 1]) if p + 1 < len(self.phases) else batches
            end = min(end, batches)
            phases.append({"name": phase.name, "start_step": phase.start_step,
                           "windows": int((end - start) * self.global_batch), "shares": self.shares(start, end)})
        return {"shares": self.shares(0, batches), "phases": phases}
