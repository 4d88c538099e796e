"""The seam between dataset adapters and the shard writer.

An adapter turns one dataset layout into ``Row`` objects; the writer never knows which layout a row came
from. Unusable input (a missing manifest, a missing column) raises ``InputError`` (exit status 2); a single
bad row is not an adapter error: the writer skips it, counts it, and records why in ``errors.jsonl``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class InputError(Exception):
    """Input the user must fix before anything can be sharded; the message names the file (and line)."""


@dataclass
class Row:
    id: str  # stable sample id, becomes ``__key__`` (sanitised by the writer)
    image: str  # path to a PNG/JPEG/... or a DICOM file
    text: str  # report or caption, UTF-8
    group: str = ""  # patient / study id: the unit of the train/val/test split ('' -> the id)
    labels: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # source, view, original path, anything else kept
    split: str = ""  # an official split to keep (train / val / test); '' = by group hash (--val/--test-fraction)
