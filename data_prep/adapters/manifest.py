"""CSV / TSV / JSONL manifest adapter: one row per image-report pair.

Columns: ``image`` (path, relative to ``--images-root``, or else to the manifest's folder, or absolute;
PNG/JPEG/... or DICOM), ``text``; optional ``id`` (default: the image path), ``group`` (patient/study id,
default: the id), ``labels`` (a JSON list, or a string split on ``|`` or ``;``) and ``view``; every other
column is kept in the sample's metadata. A malformed line or a missing column is the user's to fix
(``InputError`` naming file and line); an empty report is only a skipped row.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.rows import InputError, Row

REQUIRED = ("image", "text")
_LABEL_SEP = re.compile(r"[|;]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True,
                        help="manifest file: .csv, .tsv or .jsonl (one JSON object a line)")
    parser.add_argument("--images-root", default=None,
                        help="folder that relative image paths are resolved against (default: the manifest's folder)")


def parse_labels(value) -> list[str]:
    """Labels from a list, a JSON list string, or a ``|``/``;``-separated string."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return parse_labels(parsed)
    return [part.strip() for part in _LABEL_SEP.split(text) if part.strip()]


def records(path: Path, required: tuple = REQUIRED) -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs with the ``required`` fields; raises InputError for structural problems."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_records(path, required)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(path, "\t" if suffix == ".tsv" else ",", required)
    else:
        raise InputError(f"{path}: unknown manifest type {suffix!r} (use .csv, .tsv or .jsonl)")


def _jsonl_records(path: Path, required: tuple) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [c for c in required if c not in record]
            if missing:
                raise InputError(f"{path}:{lineno}: missing required field(s) {', '.join(missing)}")
            yield lineno, record


def _csv_records(path: Path, delimiter: str, required: tuple) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty manifest (no header line)")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(f"{path}:1: missing required column(s) {', '.join(missing)}; header is {header}")
            for values in reader:
                lineno = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(f"{path}:{lineno}: expected {len(header)} fields, got {len(values)}")
                yield lineno, dict(zip(header, values))
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e})") from None


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    path = Path(args.manifest)
    if not path.is_file():
        raise InputError(f"--manifest {path}: no such file")
    root = Path(args.images_root) if args.images_root else path.parent
    if not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    count = 0
    for lineno, record in records(path):
        count += 1
        image = record["image"]
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{path}:{lineno}: 'image' must be a non-empty path")
        image = image.strip()
        text = record["text"] if isinstance(record["text"], str) else ""
        sample_id = str(record.get("id") or "").strip() or image
        extra = {k: v for k, v in record.items() if k not in ("image", "text", "id", "group", "labels")}
        extra.setdefault("source", "manifest")
        extra["orig_path"] = image
        yield Row(id=sample_id, image=str(root / image), text=text, group=str(record.get("group") or "").strip(),
                  labels=parse_labels(record.get("labels")), metadata=extra)
    if count == 0:
        raise InputError(f"{path}: no rows (only a header or blank lines)")
