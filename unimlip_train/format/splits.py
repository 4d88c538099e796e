"""Deterministic group-based train/val/test split.

Whole groups (patients / studies) go to one split, so no patient leaks from training into evaluation.
Groups are ordered by a SHA-256 of (seed, group), never Python's per-process randomised ``hash``, so the
same seed gives the same split on every machine and every run; the first groups in that order fill test,
the next ones val, the rest train, which gives exact group counts even for small datasets.

Shared with training: evaluation carves its model-selection and label-fraction subsets by the same
``group_rank`` (``unimlip_train.eval.groups``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLITS = ("train", "val", "test")


def group_rank(seed: int, group: str) -> str:
    """Stable pseudo-random sort key of a group under a seed."""
    return hashlib.sha256(f"{seed}\x00{group}".encode("utf-8")).hexdigest()


def _count(n_groups: int, fraction: float) -> int:
    """Groups for a held-out split: rounded, but at least one when asked for and there are enough groups."""
    if fraction <= 0:
        return 0
    return max(1, round(n_groups * fraction)) if n_groups >= 3 else 0


def assign_groups(groups: Iterable[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Map each distinct group to 'train', 'val' or 'test'."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    ordered = sorted(set(groups), key=lambda g: (group_rank(seed, g), g))
    n_test = _count(len(ordered), test_fraction)
    n_val = _count(len(ordered), val_fraction)
    if n_test + n_val >= len(ordered):  # tiny inputs: keep at least one group for training
        n_test, n_val = 0, 0
    out = {}
    for i, g in enumerate(ordered):
        out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def active_splits(val_fraction: float, test_fraction: float) -> list[str]:
    """Splits that exist in the index for these fractions (train always)."""
    return [s for s, f in zip(SPLITS, (1.0, val_fraction, test_fraction)) if f > 0]
