"""The seam between dataset adapters and the shard writer.

An adapter turns one dataset layout into ``Row`` objects; the writer never knows which layout a row came
from. Unusable input (a missing manifest, a missing column) raises ``InputError`` (exit status 2); a single
bad row is not an adapter error: the adapter sets ``skip`` (or the writer finds the image unusable), and the
writer skips it, counts it, and records why in ``errors.jsonl``.

A row is one image, or (``--group-views study``) one study: ``views`` then lists its images in a stable order,
``image`` being the first one's path.

Here, in the floor both sides stand on, because training applies the same view rules (``is_frontal``: the
loader's frontal-view choice) to the samples the writer made from these rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
               "test": "test"}  # official split spellings (MIMIC-CXR says "validate") -> the writer's names
FRONTAL = ("PA", "AP")


class InputError(Exception):
    """Input the user must fix before anything can be sharded; the message names the file (and line)."""


@dataclass(frozen=True)
class View:
    """One image of a study sample."""

    path: str
    position: str = ""  # PA / AP / LATERAL / LL ... ('' unknown: the DICOM header may still tell)
    name: str = ""  # its id within the study (dicom_id, file stem)


@dataclass
class Row:
    id: str  # stable sample id, becomes ``__key__`` (sanitised by the writer)
    image: str  # path to a PNG/JPEG/... or a DICOM file (a study's first view)
    text: str  # report or caption, UTF-8
    group: str = ""  # patient / study id: the unit of the train/val/test split ('' -> the id)
    labels: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # source, view, original path, anything else kept
    views: list = field(default_factory=list)  # a study sample's View list (empty: a one-image row)
    split: str = ""  # an official split (train / val / test); '' -> assigned from the group
    skip: str = ""  # why this row cannot be used; the writer records it instead of decoding anything


def is_frontal(position: str) -> bool:
    """PA / AP projections (also "AP AXIAL", "PA LLD" ...): what radiologists read first."""
    return position.strip().upper().split(" ")[0] in FRONTAL


def study_order(views: list) -> list:
    """A study's views in the stable order samples keep: PA, AP, other frontal, the rest; then by name/path."""
    def rank(v: View) -> tuple:
        head = v.position.strip().upper()
        kind = 0 if head == "PA" else 1 if head == "AP" else 2 if is_frontal(head) else 3 if head else 4
        return kind, v.name or v.path, v.path
    return sorted(views, key=rank)
