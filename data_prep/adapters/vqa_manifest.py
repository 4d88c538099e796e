"""VQA manifest (CSV / TSV / JSONL, one question a line) for any other VQA set.

Columns: ``image`` (path, relative to ``--images-root``, or else to the manifest's folder, or absolute),
``question``, ``answer``; optional ``answer_type`` (CLOSED / OPEN; default CLOSED for yes/no answers),
``split`` (an official split: train, val/validate, test; kept instead of the split by image hash; then every
line needs one) and ``qid``; every other column is kept with its question. Questions about the same image and
split become one sample. With ``--images-root`` every image must resolve inside it (as for ``manifest``).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

from data_prep.adapters.manifest import _inside, _records, _split
from data_prep.adapters.vqa import pack_rows
from unimlip_train.format.rows import InputError, Row

REQUIRED = ("image", "question", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest file: .csv, .tsv or .jsonl")
    parser.add_argument("--images-root", default=None,
                        help="folder that image paths are resolved against and must stay inside (default: the "
                             "manifest's folder, with no containment check)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="trusted manifest: accept paths that resolve outside --images-root")


def _records_of(path: Path, root: Path, contained: Path | None) -> Iterator[tuple[str, dict]]:
    for lineno, r in _records(path, REQUIRED):
        where = f"{path}:{lineno}"
        image = str(r["image"]).strip()
        if not image:
            raise InputError(f"{where}: 'image' must be a non-empty path")
        skip = ""
        if contained is not None and not _inside(root / image, contained):
            skip = f"image path {image!r} resolves outside --images-root {root} (--allow-outside-root to accept)"
        yield where, {**r, "image": str(root / image), "image_name": image, "skip": skip,
                      "split": _split(r["split"], where) if "split" in r else ""}


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    path = Path(args.manifest)
    if not path.is_file():
        raise InputError(f"--manifest {path}: no such file")
    root = Path(args.images_root) if args.images_root else path.parent
    if not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    contained = Path(os.path.realpath(root)) if args.images_root and not args.allow_outside_root else None
    return pack_rows(_records_of(path, root, contained), "vqa-manifest")
