"""VQA-RAD (Lau et al., Sci. Data 2018): ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder``.

Every JSON record is one question: ``qid, image_name, question, answer, answer_type (CLOSED / OPEN),
question_type, phrase_type, image_organ, ...`` (all kept with the question). The official test set is the
questions whose ``phrase_type`` starts with ``test`` (``test_freeform``, ``test_para``: 451 questions), the
rest is train, as in MEVF, M3AE and PMC-CLIP. An image asked about in both becomes one sample in each split.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_prep.adapters.vqa import json_questions, pack_rows
from unimlip_train.format.rows import InputError, Row

REQUIRED = ("image_name", "question", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="the VQA-RAD question file (VQA_RAD Dataset Public.json)")
    parser.add_argument("--images", required=True, help="the image folder (VQA_RAD Image Folder)")


def _records(path: Path, images: Path) -> Iterator[tuple[str, dict]]:
    for where, r in json_questions(path, REQUIRED):
        split = "test" if str(r.get("phrase_type", "")).startswith("test") else "train"
        yield where, {**r, "image": str(images / r["image_name"]), "split": split}


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    path, images = Path(args.json), Path(args.images)
    if not path.is_file():
        raise InputError(f"--json {path}: no such file")
    if not images.is_dir():
        raise InputError(f"--images {images}: no such directory")
    return pack_rows(_records(path, images), "vqa-rad")
