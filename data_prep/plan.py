"""Row planning: every row's split and position fixed before any image is decoded.

Why: determinism. Rows with an official ``split`` keep it; the others are split by a seeded SHA-256 of their
group (``unimlip_train.format.splits``), and rows are sorted by key within a split. Together with the
deterministic tar headers (``data_prep.tar``) and codecs, the same inputs and options give byte-identical
shards for any ``--workers``, and the SLURM array (``launch.sharding``) can slice the very same task order.
The plan's fingerprint identifies the planned output, so a resume journal is only reused for the same inputs
and options.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm import tqdm

from data_prep.options import WriterOptions
from unimlip_train.format.rows import InputError, Row, View
from unimlip_train.format.shards import sample_key
from unimlip_train.format.splits import SPLITS, active_splits, assign_groups


@dataclass
class Planned:
    """A row the writer will try to write: its sample key and its split group."""

    key: str
    row: Row
    group: str


def error_entry(row: Row, key: str, split: str, reason: str) -> dict:
    """One ``errors.jsonl`` line: the skipped row (or dropped view) and why."""
    return {"id": row.id, "key": key, "split": split, "image": row.image, "reason": reason}


def plan(rows: Iterable[Row], options: WriterOptions, progress: bool) -> tuple[dict[str, list[Planned]], list[dict]]:
    """Fix every row's split and order before any image work; rows with no usable text are dropped here.

    Rows with an official ``split`` keep it (then every row needs one); the others are split by group."""
    seen: dict[str, str] = {}
    kept: list[Planned] = []
    errors: list[dict] = []
    for row in tqdm(rows, desc="reading rows", unit="row", disable=not progress or None, leave=False):
        key = sample_key(row.id or row.image)
        if row.skip:
            errors.append(error_entry(row, key, row.split, row.skip))
        elif not isinstance(row.text, str) or not row.text.strip():
            errors.append(error_entry(row, key, "", "empty report"))
        elif key in seen:
            errors.append(error_entry(row, key, "", f"duplicate id: same key as id {seen[key]!r}"))
        else:
            seen[key] = row.id
            kept.append(Planned(key, row, str(row.group) if row.group else key))
    official = {p.row.split for p in kept}
    if official - {""} and "" in official:
        missing = next(p.row.id for p in kept if not p.row.split)
        raise InputError(f"some rows give an official split and some do not (e.g. id {missing!r}): give every row one")
    if official - {""}:
        split_of = {p.key: p.row.split for p in kept}
        names = ["train"] + [s for s in SPLITS[1:] if s in official]
    else:
        by_group = assign_groups((p.group for p in kept), options.seed, options.val_fraction, options.test_fraction)
        split_of = {p.key: by_group[p.group] for p in kept}
        names = active_splits(options.val_fraction, options.test_fraction)
    by_split: dict[str, list[Planned]] = {s: [] for s in names}
    for p in kept:
        by_split[split_of[p.key]].append(p)
    for items in by_split.values():
        items.sort(key=lambda p: p.key)
    return by_split, errors


def row_views(row: Row) -> list[View]:
    """The images of a row: a study's views, or its one image."""
    return row.views or [View(row.image, str(row.metadata.get("view", "") or ""))]


def image_task(path: str, options: WriterOptions) -> tuple:
    """What one worker needs to encode one image (plain values: SLURM array slices store them as JSON)."""
    return (path, options.max_size, options.jpeg_quality, options.keep_16bit, options.window, options.frame,
            options.max_pixels)


def planned_tasks(items: list[Planned], options: WriterOptions, start: int = 0) -> tuple[list[tuple], list[tuple]]:
    """Encode tasks of rows ``start..`` of one split in order, and each task's (row position, view, views)."""
    tasks, owners = [], []
    for pos in range(start, len(items)):
        views = row_views(items[pos].row)
        for i, view in enumerate(views):
            tasks.append(image_task(view.path, options))
            owners.append((pos, i, len(views)))
    return tasks, owners


def fingerprint(by_split: dict[str, list[Planned]], options: WriterOptions) -> str:
    """Identifies the planned output: a journal is only resumed for the same inputs and options."""
    h = hashlib.sha256(json.dumps(options.content(), sort_keys=True).encode())
    for split, items in by_split.items():
        for p in items:
            r = p.row
            rec = [split, p.key, r.id, r.image, r.text, p.group, list(r.labels), r.metadata]
            h.update(json.dumps(rec, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()
