"""VQA manifest (CSV / TSV / JSONL, one question a line) for any other VQA set.

Columns: ``image`` (path, relative to ``--images-root``, or else to the manifest's folder, or absolute),
``question``, ``answer``; optional ``answer_type`` (CLOSED / OPEN; default CLOSED for yes/no answers),
``split`` (train / val / test, kept; empty: by image hash with --val/--test-fraction) and ``qid``; every other
column is kept with its question. Questions about the same image and split become one sample.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_prep.adapters.manifest import records
from data_prep.adapters.vqa import pack_rows
from data_prep.rows import InputError, Row

REQUIRED = ("image", "question", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest file: .csv, .tsv or .jsonl")
    parser.add_argument("--images-root", default=None,
                        help="folder that relative image paths are resolved against (default: the manifest's folder)")


def _records(path: Path, root: Path) -> Iterator[tuple[str, dict]]:
    for lineno, r in records(path, REQUIRED):
        image = str(r["image"]).strip()
        if not image:
            raise InputError(f"{path}:{lineno}: 'image' must be a non-empty path")
        yield f"{path}:{lineno}", {**r, "image": str(root / image), "image_name": image,
                                    "split": str(r.get("split") or "").strip().lower()}


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    path = Path(args.manifest)
    if not path.is_file():
        raise InputError(f"--manifest {path}: no such file")
    root = Path(args.images_root) if args.images_root else path.parent
    if not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    return pack_rows(_records(path, root), "vqa-manifest")
