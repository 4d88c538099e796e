"""Group-aware subsets of a labelled split: a validation part carved from train, and a labelled fraction.

Whole groups (patients / studies, the shard metadata's ``group``) go one way, so no patient's images sit on
both sides of a model-selection split, and the 1 % / 10 % label fractions of the CXR-CLIP / MGCA protocols
sample patients, not images. Within each stratum (a class, so every class keeps its share) groups are ordered
by the seeded SHA-256 the shard writer uses for its splits (``unimlip_train.format.splits.group_rank``): deterministic for
any world size and loader order.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np

from unimlip_train.format.splits import group_rank


def _ordered_groups(strata: Sequence[Hashable], groups: Sequence[str], seed: int) -> dict[Hashable, list[str]]:
    """Stratum -> its groups in seeded hash order; a group's stratum is its most frequent one (ties: smallest)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for stratum, group in zip(strata, groups):
        counts[str(group)][stratum] += 1
    by_stratum: dict[Hashable, list[str]] = defaultdict(list)
    for group, c in counts.items():
        top = max(c.values())
        by_stratum[min(s for s, n in c.items() if n == top)].append(group)
    return {s: sorted(gs, key=lambda g: (group_rank(seed, g), g)) for s, gs in sorted(by_stratum.items())}


def _indices(groups: Sequence[str], chosen: set) -> np.ndarray:
    mask = np.fromiter((str(g) in chosen for g in groups), dtype=bool, count=len(groups))
    return np.flatnonzero(mask)


def carve_groups(strata: Sequence[Hashable], groups: Sequence[str], fraction: float = 0.2,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, validation)`` sample indices: every round(1 / fraction)-th group of each stratum validates."""
    step = max(2, round(1.0 / fraction))
    val = {g for ordered in _ordered_groups(strata, groups, seed).values() for g in ordered[step - 1::step]}
    everything = set(map(str, groups))
    return _indices(groups, everything - val), _indices(groups, val)


def sample_groups(strata: Sequence[Hashable], groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Sample indices of the first ceil(fraction x groups) groups of each stratum (at least one per stratum)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    chosen = {g for ordered in _ordered_groups(strata, groups, seed).values()
              for g in ordered[:max(1, math.ceil(fraction * len(ordered)))]}
    return _indices(groups, chosen)
