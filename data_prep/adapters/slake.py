"""SLAKE (Liu et al., ISBI 2021): ``ROOT/train.json``, ``validate.json``, ``test.json`` and ``ROOT/imgs/``.

Every record is one question: ``img_id, img_name (e.g. xmlab102/source.jpg), question, answer, answer_type,
q_lang (en / zh), content_type, base_type, location, modality, qid`` (all kept with the question). The three
official files become the train / val / test splits; English questions only unless ``--all-languages``.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_prep.adapters.vqa import json_questions, pack_rows
from unimlip_train.format.rows import InputError, Row

FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
REQUIRED = ("img_name", "question", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the SLAKE folder (train.json, validate.json, test.json, imgs/)")
    parser.add_argument("--images", default=None, help="image folder (default: ROOT/imgs)")
    parser.add_argument("--all-languages", action="store_true", help="keep the Chinese questions too (q_lang zh)")


def _records(root: Path, images: Path, all_languages: bool) -> Iterator[tuple[str, dict]]:
    for split, name in FILES.items():
        for where, r in json_questions(root / name, REQUIRED):
            if all_languages or r.get("q_lang", "en") == "en":
                yield where, {**r, "image": str(images / r["img_name"]), "image_name": r["img_name"], "split": split}


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    root = Path(args.root)
    images = Path(args.images) if args.images else root / "imgs"
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise InputError(f"--root {root}: missing {', '.join(missing)}")
    if not images.is_dir():
        raise InputError(f"--images {images}: no such directory")
    return pack_rows(_records(root, images, args.all_languages), "slake")
