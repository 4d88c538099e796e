"""The rest of an interrupted epoch on another number of loader units (a world size or ``data.num_workers``
change mid-epoch): which samples the old units consumed, what remains, and each new unit's share of it.

A unit's epoch is a ``UnitSpec``: for each source, ranges of positions in the epoch's sample sequence
(``plan.py``), read in order and shuffled with the unit's seeded buffer, and how many samples its mix takes. A
fresh epoch gives each unit the plan's contiguous window. The positions an old unit consumed follow from its
spec and its cursor's ``raw`` count alone: the mix order, the shuffle buffer and the reader depend on positions,
never on content (a shard short of its index count pads the missing positions, ``raw.py``), so they are replayed
on integers without reading a byte (about a microsecond per consumed sample).

The remainder of epoch E is every old unit's items minus what any of them consumed (a unit that finished E
counts as having consumed all of it; what it dropped stays dropped). It is cut into the new units' contiguous
shares (``windows``, as a fresh epoch is), each shuffled with its own seed; every new unit takes the same
number of samples per source, so every rank gets the same number of batches. A ``StreamView`` (every old unit's
cursor, read from all the old ranks' states) is what the new stream keeps: as the pending state until it draws
its first batch (so a reshard back before any step restores the old units exactly), then as the parent of its
recut epochs (so a second reshard in the same epoch recuts the recut). Epochs after the recut follow the plan.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from unimlip_train.data.plan import stable_seed, windows
from unimlip_train.data.raw import buffer_seed, shuffled

#: what must match for positions of one stream's layout to mean the same samples in another
LAYOUT_KEYS = ("world_size", "workers", "seed", "plan", "micro_batch_size", "steps_per_epoch")


@dataclass(frozen=True)
class PlanFacts:
    """What the recut needs of the data plan: each source's quota and mix weight, the seed, resampling."""

    quotas: tuple
    weights: tuple
    seed: int
    resampled: bool


@dataclass(frozen=True)
class UnitSpec:
    """One unit's epoch. ``unit`` names it in the seeds (an int: the plan's own window; a tuple: a recut share);
    ``ranges[s]``: the positions of source ``s`` it reads, in order (top-up continues after the last one);
    ``counts[s]``: the samples its mix takes from source ``s``."""

    unit: Any
    ranges: tuple
    counts: tuple

    def budget(self, micro_batch: int) -> int:
        """Samples the unit delivers in this epoch: whole micro batches."""
        return sum(self.counts) // micro_batch * micro_batch


def fresh_spec(plan: PlanFacts, units: int, unit: int) -> UnitSpec:
    """The plan's window of ``unit`` out of ``units``: a contiguous range of each source's quota."""
    return UnitSpec(unit, tuple((windows(q, units, unit),) for q in plan.quotas),
                    tuple(q // units for q in plan.quotas))


def mix_order(spec: UnitSpec, plan: PlanFacts, epoch: int) -> Iterator[int]:
    """The source of each raw sample the unit draws: a seeded permutation with exact per-source counts, then
    weighted draws (the top-up)."""
    labels = [sidx for sidx, count in enumerate(spec.counts) for _ in range(count)]
    rng = random.Random(stable_seed(plan.seed, "mix", epoch, spec.unit))
    rng.shuffle(labels)
    yield from labels
    while True:
        yield rng.choices(range(len(spec.counts)), weights=plan.weights)[0]


def consumed(spec: UnitSpec, plan: PlanFacts, epoch: int, raw: int, bufsize: int) -> list:
    """Per source, the positions the unit's first ``raw`` raw samples came from (an int array; resampled: their
    number), replayed without reading."""
    drawn = Counter(itertools.islice(mix_order(spec, plan, epoch), raw))
    out = []
    for sidx, ranges in enumerate(spec.ranges):
        n = drawn.get(sidx, 0)
        if plan.resampled:
            out.append(n)
            continue
        size = sum(b - a for a, b in ranges)
        k = min(n, size)
        order = shuffled(iter(range(size)), bufsize, buffer_seed(plan.seed, epoch, sidx, spec.unit))
        index = np.fromiter(itertools.islice(order, k), dtype=np.int64, count=k)
        starts = np.array([a for a, _ in ranges], dtype=np.int64)
        offsets = np.cumsum([0] + [b - a for a, b in ranges], dtype=np.int64)
        which = np.searchsorted(offsets, index, side="right") - 1
        tail = ranges[-1][1]
        out.append(np.concatenate([starts[which] + index - offsets[which], np.arange(tail, tail + n - k)]))
    return out


def _runs(positions: np.ndarray, end: int) -> tuple:
    """Sorted positions as ``(start, stop)`` ranges (``((end, end),)`` when empty: top-up starts at ``end``)."""
    if not len(positions):
        return ((end, end),)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(positions)]])
    return tuple((int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(starts, stops))


class StreamView:
    """Every unit of one stream layout where its ranks' states left it: ``layout`` (``LAYOUT_KEYS``), the units'
    cursors in unit order (rank-major), each rank's delivered count, and the recut epochs' parents."""

    def __init__(self, data: dict, plan: PlanFacts):
        self.data, self.plan = data, plan
        self.layout, self.units = data["layout"], data["units"]
        self.recuts = {int(e): StreamView(parent, plan) for e, parent in data.get("recuts", {}).items()}
        self._remainders: dict = {}
        self._digest: Optional[int] = None

    @staticmethod
    def build(states: list) -> dict:
        """The view (as stored) of a stream from all its ranks' ``state_dict()``s, in rank order; a pending
        state already is one."""
        if "view" in states[0]:
            return states[0]["view"]
        recuts: dict = {}
        for state in states:
            recuts.update(state.get("recuts", {}))
        return {"layout": {k: states[0][k] for k in LAYOUT_KEYS}, "units": [c for s in states for c in s["cursors"]],
                "delivered": [s["delivered"] for s in states], "recuts": recuts}

    @property
    def n_units(self) -> int:
        return self.layout["world_size"] * self.layout["workers"]

    def digest(self) -> int:
        """Names this view in the recut seeds (positions only: the skip counts do not enter)."""
        if self._digest is None:
            cursors = [(c["epoch"], c["raw"], c["taken"], c["bufsize"]) for c in self.units]
            parents = sorted((e, p.digest()) for e, p in self.recuts.items())
            self._digest = stable_seed(json.dumps([self.layout, cursors, parents], sort_keys=True))
        return self._digest

    def spec(self, epoch: int, unit: int) -> UnitSpec:
        parent = self.recuts.get(epoch)
        return parent.share(epoch, self.n_units, unit) if parent else fresh_spec(self.plan, self.n_units, unit)

    def position(self, unit: int) -> tuple:
        """(epoch, raw) of a unit, a unit that cannot deliver another batch of its epoch counting as at the start
        of the next one."""
        c, mb = self.units[unit], self.layout["micro_batch_size"]
        if self.spec(c["epoch"], unit).budget(mb) - c["taken"] < mb:
            return c["epoch"] + 1, 0
        return c["epoch"], c["raw"]

    def interrupted(self) -> tuple:
        """(first epoch the units are in, [epochs partly consumed]): usually (E, [E]); (E, []) at a boundary."""
        where = [self.position(u) for u in range(self.n_units)]
        first, last = min(e for e, _ in where), max(e for e, _ in where)
        return first, [e for e in range(first, last + 1) if any(eu > e or (eu == e and raw) for eu, raw in where)]

    def remainder(self, epoch: int) -> list:
        """Per source, the sorted positions of ``epoch`` that no unit consumed (resampled: their number)."""
        if epoch in self._remainders:
            return self._remainders[epoch]
        q = self.plan.quotas
        items, used = [np.zeros(n, bool) for n in q], [np.zeros(n, bool) for n in q]
        counts = [0] * len(q)
        for u in range(self.n_units):
            at, raw = self.position(u)
            if at > epoch:
                continue
            spec = self.spec(epoch, u)
            taken = consumed(spec, self.plan, epoch, raw, self.units[u]["bufsize"]) if at == epoch else None
            for s, ranges in enumerate(spec.ranges):
                if self.plan.resampled:
                    counts[s] += max(0, sum(b - a for a, b in ranges) - (taken[s] if taken else 0))
                    continue
                for a, b in ranges:
                    items[s][a:b] = True
                if taken is not None:
                    used[s][taken[s][taken[s] < q[s]]] = True
        rest = counts if self.plan.resampled else [np.flatnonzero(i & ~c) for i, c in zip(items, used)]
        self._remainders[epoch] = rest
        return rest

    def remaining(self, epoch: int) -> int:
        return sum(r if self.plan.resampled else len(r) for r in self.remainder(epoch))

    def share(self, epoch: int, units: int, unit: int) -> UnitSpec:
        """New unit ``unit``'s contiguous share of this view's remainder of ``epoch`` cut for ``units`` units."""
        ranges, counts = [], []
        for s, rest in enumerate(self.remainder(epoch)):
            total = rest if self.plan.resampled else len(rest)
            lo, hi = windows(total, units, unit)
            ranges.append(((0, hi - lo),) if self.plan.resampled else _runs(rest[lo:hi], self.plan.quotas[s]))
            counts.append(total // units)
        return UnitSpec(("recut", self.digest(), unit), tuple(ranges), tuple(counts))

    def skips(self) -> list:
        """Every unit's skip statistics (as stored)."""
        return [c["skips"] for c in self.units if "skips" in c]
