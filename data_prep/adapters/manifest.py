"""CSV / TSV / JSONL manifest adapter: one row per image-report pair (or per study, ``--group-views study``).

Columns: ``image`` (path, relative to ``--images-root``, or else to the manifest's folder, or absolute;
PNG/JPEG/... or DICOM), ``text``; optional ``id`` (default: the image path), ``group`` (patient/study id,
default: the id), ``labels`` (a JSON list, or a string split on ``|`` or ``;``), ``view`` (PA, AP, LATERAL ...),
``split`` (an official split: train, val/validate, test; kept instead of the group-hash split; then every row
needs one) and ``study`` (for ``--group-views study``); every other column is kept in the sample's metadata.
A malformed line, a byte that is not UTF-8 or a missing column is the user's to fix (``InputError`` naming
file and line); an empty report, or one longer than ``--max-report-bytes`` (default 1 MiB of UTF-8; pathology
reports and concatenated studies do get long), is only a skipped row with its reason in errors.jsonl, from a
CSV/TSV as from a JSONL manifest. A CSV field is read up to 16 times that limit; a longer one makes the line
malformed.

Paths: with ``--images-root``, every image path (relative or absolute, after following symlinks) must resolve
inside that folder, else the row is skipped with the reason (``--allow-outside-root`` lifts this for a trusted
manifest); without it, paths are taken as given, relative to the manifest's folder.

``--group-views study``: the rows of one ``study`` become one sample holding all its images (at most
``--max-views``, frontal PA/AP first, then by path) with their view positions, one report (the first non-empty
one; studies whose rows disagree are counted on stderr), the union of the labels, and the study's split.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from unimlip_train.format.report_text import normalise_report
from unimlip_train.format.rows import SPLIT_NAMES, InputError, Row, View, study_order

REQUIRED = ("image", "text")
_LABEL_SEP = re.compile(r"[|;]")
DEFAULT_MAX_REPORT_BYTES = 1 << 20
#: How far beyond --max-report-bytes a CSV field is still read, so that a long report is a skipped row
#: rather than a malformed line.
CSV_FIELD_FACTOR = 16


#: How a row whose image lies outside --images-root is skipped (also how studies count those rows).
_OUTSIDE_ROOT = "resolves outside --images-root"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True,
                        help="manifest file: .csv, .tsv or .jsonl (one JSON object a line)")
    parser.add_argument("--images-root", default=None,
                        help="folder that image paths are resolved against and must stay inside (default: the "
                             "manifest's folder, with no containment check)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="trusted manifest: accept paths that resolve outside --images-root")
    parser.add_argument("--group-views", choices=("none", "study"), default="none",
                        help="study: one sample per 'study' column value, with all its images (default none)")
    parser.add_argument("--max-views", type=int, default=4, metavar="N",
                        help="with --group-views study: at most N images per study, frontal first (default 4)")
    parser.add_argument("--max-report-bytes", type=int, default=DEFAULT_MAX_REPORT_BYTES, metavar="N",
                        help=f"a report longer than N bytes (UTF-8) is skipped with the reason in errors.jsonl "
                             f"(default {DEFAULT_MAX_REPORT_BYTES}, 1 MiB)")


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


def _records(path: Path, required: tuple = REQUIRED,
             max_field_bytes: int = DEFAULT_MAX_REPORT_BYTES) -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs with the ``required`` fields; raises InputError for structural problems. A CSV
    field may be up to ``CSV_FIELD_FACTOR * max_field_bytes`` characters (the caller skips what is too long)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_records(path, required)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(path, "\t" if suffix == ".tsv" else ",", required, CSV_FIELD_FACTOR * max_field_bytes)
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


def _utf8_lines(path: Path, handle) -> Iterator[str]:
    """The file's lines decoded one at a time, so a byte that is not UTF-8 is reported with its line number."""
    for lineno, raw in enumerate(handle, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start + 1} of the line)") from None


def _csv_records(path: Path, delimiter: str, required: tuple, field_limit: int) -> Iterator[tuple[int, dict]]:
    previous = csv.field_size_limit(max(field_limit, csv.field_size_limit()))  # process-wide: restored below
    try:
        with open(path, "rb") as f:
            reader = csv.reader(_utf8_lines(path, f), delimiter=delimiter, strict=True)
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
                hint = " (raise --max-report-bytes for longer reports)" if "field larger" in str(e) else ""
                raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e}){hint}") from None
    finally:
        csv.field_size_limit(previous)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) inside ``root`` (already resolved)."""
    return os.path.commonpath([os.path.realpath(path), root]) == str(root)


def _split(value, where: str) -> str:
    text = str(value or "").strip().lower()
    if text not in SPLIT_NAMES:
        raise InputError(f"{where}: split {value!r} is not one of train, val (valid, validate, validation), test")
    return SPLIT_NAMES[text]


def _image_rows(args: argparse.Namespace, path: Path) -> Iterator[tuple[str, Row]]:
    """(study or '', Row) per manifest line, paths resolved and checked."""
    root = Path(args.images_root) if args.images_root else path.parent
    if not root.is_dir():
        raise InputError(f"--images-root {root}: no such directory")
    contained = Path(os.path.realpath(root)) if args.images_root and not args.allow_outside_root else None
    count = 0
    for lineno, record in _records(path, REQUIRED, args.max_report_bytes):
        count += 1
        where = f"{path}:{lineno}"
        image = record["image"]
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{where}: 'image' must be a non-empty path")
        image = image.strip()
        text = record["text"] if isinstance(record["text"], str) else ""
        sample_id = str(record.get("id") or "").strip() or image
        extra = {k: v for k, v in record.items() if k not in ("image", "text", "id", "group", "labels", "split")}
        extra.setdefault("source", "manifest")
        extra["orig_path"] = image
        resolved = root / image
        skip = ""
        report_bytes = len(text.encode("utf-8"))
        if contained is not None and not _inside(resolved, contained):
            skip = (f"image path {image!r} {_OUTSIDE_ROOT} {root} (pass --allow-outside-root for a trusted "
                    "manifest)")
        elif report_bytes > args.max_report_bytes:
            skip = (f"{where}: report of {report_bytes} bytes is longer than --max-report-bytes "
                    f"{args.max_report_bytes}")
            text = ""  # not kept in memory
        split = _split(record["split"], where) if "split" in record else ""
        study = str(record.get("study") or "").strip()
        if args.group_views == "study" and not study:
            raise InputError(f"{where}: --group-views study needs a non-empty 'study' value on every row")
        yield study, Row(id=sample_id, image=str(resolved), text=text, group=str(record.get("group") or "").strip(),
                         labels=parse_labels(record.get("labels")), metadata=extra, split=split, skip=skip)
    if count == 0:
        raise InputError(f"{path}: no rows (only a header or blank lines)")


def _studies(rows: Iterator[tuple[str, Row]], max_views: int) -> Iterator[Row]:
    """One Row per study (in order of first appearance) from its image rows."""
    studies: dict[str, list[Row]] = {}
    for study, row in rows:
        studies.setdefault(study, []).append(row)
    disagreeing = outside = 0
    for study, members in studies.items():
        splits = {r.split for r in members}
        if len(splits) > 1:
            raise InputError(f"study {study!r}: its rows give different splits {sorted(splits)}")
        usable = [r for r in members if not r.skip]
        outside += sum(_OUTSIDE_ROOT in r.skip for r in members)
        texts = [r.text for r in usable if r.text.strip()]
        disagreeing += len({normalise_report(t) for t in texts}) > 1
        views = study_order([View(r.image, str(r.metadata.get("view", "") or ""), r.id) for r in usable])
        first = next((r for r in members if r.image == views[0].path), members[0]) if views else members[0]
        labels = list(dict.fromkeys(label for r in members for label in r.labels))
        metadata = {**first.metadata, "study": study, "views_in_study": len(members),
                    "views_kept": min(len(views), max_views)}
        skip = "" if views else f"every image of study {study!r} was refused: {members[0].skip}"
        yield Row(id=study, image=views[0].path if views else first.image, text=texts[0] if texts else "",
                  group=first.group or study, labels=labels, metadata=metadata, views=views[:max_views],
                  split=first.split, skip=skip)
    if disagreeing or outside:
        print(f"manifest: {disagreeing} studies whose rows have different reports (the first one is used); "
              f"{outside} images outside --images-root left out of their studies (other refused rows: "
              "errors.jsonl)", file=sys.stderr)


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    path = Path(args.manifest)
    if not path.is_file():
        raise InputError(f"--manifest {path}: no such file")
    if args.max_views < 1:
        raise InputError(f"--max-views {args.max_views}: must be >= 1")
    if args.max_report_bytes < 1:
        raise InputError(f"--max-report-bytes {args.max_report_bytes}: must be >= 1")
    rows = _image_rows(args, path)
    if args.group_views == "study":
        yield from _studies(rows, args.max_views)
    else:
        yield from (row for _, row in rows)
