"""MIMIC-CXR style: ``files/pXX/pSUBJECT/sSTUDY/*.dcm`` (or ``.jpg``/``.png``, as in MIMIC-CXR-JPG) with the
study's free-text report beside the folder as ``files/pXX/pSUBJECT/sSTUDY.txt``.

One row per image, or with ``--group-views study`` one row per study holding its images (at most ``--max-views``,
frontal PA/AP first by the metadata CSV, then by dicom_id; a view position the CSV lacks is read from the DICOM
header). group = the subject id ("p10000032"), so every study of a patient lands in one split.
- text: the ``--sections`` parsed from the report's ``HEADER:`` lines, by the rules in ``unimlip_train.format.report_text``
  (default FINDINGS then IMPRESSION; "FINDINGS AND IMPRESSION" counts for both); when the report has none of them, the whole report
  (metadata ``text_from`` says which). ``___`` de-identification gaps are cleaned as in ``unimlip_train.format.report_text``.
  A study without a report file still yields its images, with empty text, so the writer records them.
- An image present both as DICOM and JPEG/PNG in one study is used once, the DICOM preferred (the source of truth,
  possibly 16-bit).
- ``--metadata`` (mimic-cxr-2.0.0-metadata.csv: dicom_id, ViewPosition) fills ``view``; ``--labels``
  (mimic-cxr-2.0.0-chexpert.csv or negbio: study_id, one column per finding holding 1/0/-1/blank) gives the
  labels: the columns equal to 1 (uncertain -1 is not a label).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections.abc import Iterator

from unimlip_train.format.report_text import clean_report, parse_sections, select_sections, split_sections
from unimlip_train.format.rows import InputError, Row, View, study_order

_PREFERENCE = {".dcm": 0, ".png": 1, ".jpg": 2, ".jpeg": 2}  # lower is preferred for one dicom_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The MIMIC-CXR inputs."""
    parser.add_argument("--root", required=True,
                        help="dataset root holding files/pXX/pSUBJECT/sSTUDY/ (or the files/ folder itself)")
    parser.add_argument("--metadata", default="",
                        help="CSV with dicom_id and ViewPosition columns (mimic-cxr-2.0.0-metadata.csv)")
    parser.add_argument("--labels", default="",
                        help="CheXpert-style CSV: study_id plus one column per finding (1 positive, 0/-1/blank not)")
    parser.add_argument("--sections", type=parse_sections, default=parse_sections("findings,impression"),
                        help="report sections that make the text, in order (default: findings,impression)")
    parser.add_argument("--deid-placeholder", default="",
                        help="text put where ___ de-identification gaps were (default: remove them)")
    parser.add_argument("--group-views", choices=("none", "study"), default="none",
                        help="study: one sample per study with all its images and one report (default none)")
    parser.add_argument("--max-views", type=int, default=4, metavar="N",
                        help="with --group-views study: at most N images per study, frontal first (default 4)")


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    """Yield one row per study image, subjects and studies in sorted order."""
    if not os.path.isdir(args.root):
        raise InputError(f"{args.root}: no such dataset folder")
    if args.max_views < 1:
        raise InputError(f"--max-views {args.max_views}: must be >= 1")
    views = _read_views(args.metadata) if args.metadata else {}
    labels = _read_labels(args.labels) if args.labels else {}
    files = os.path.join(args.root, "files")
    base = files if os.path.isdir(files) else args.root
    studies = images = without_report = without_images = 0
    for subject, study, folder in _studies(base):
        studies += 1
        report = folder + ".txt"
        pictures = _images(folder) if os.path.isdir(folder) else []
        if not pictures:
            without_images += 1
            continue
        if os.path.isfile(report):
            text, text_from = _report_text(report, args.sections, args.deid_placeholder)
        else:
            without_report += 1
            text, text_from, report = "", "", ""
        images += len(pictures)
        common = {"source": "mimic-cxr", "subject_id": subject, "study_id": study, "orig_report": report,
                  "text_from": text_from}
        if args.group_views == "study":
            ordered = study_order([View(path, views.get(dicom_id, ""), dicom_id) for dicom_id, path in pictures])
            kept = ordered[:args.max_views]
            yield Row(id=f"{subject}_{study}", image=kept[0].path, text=text, group=subject,
                      labels=labels.get(study.lstrip("s"), []), views=kept,
                      metadata={**common, "view": kept[0].position, "dicom_id": kept[0].name,
                                "views_in_study": len(ordered), "views_kept": len(kept)})
            continue
        for dicom_id, path in pictures:
            yield Row(
                id=f"{subject}_{study}_{dicom_id}",
                image=path,
                text=text,
                group=subject,
                labels=labels.get(study.lstrip("s"), []),
                metadata={**common, "view": views.get(dicom_id, ""), "dicom_id": dicom_id},
            )
    if not studies:
        raise InputError(f"{args.root}: no studies found (expected files/pXX/pSUBJECT/sSTUDY/ folders)")
    print(f"mimic-cxr: {studies} studies, {images} image rows; {without_report} studies without a report "
          f"(rows kept, empty text); {without_images} studies without images skipped", file=sys.stderr)


def _studies(base: str) -> Iterator[tuple[str, str, str]]:
    """(subject id, study id, study folder path without suffix) for every study folder or report file."""
    for bucket in _sorted_names(base, r"p\d+"):
        for subject in _sorted_names(os.path.join(base, bucket), r"p\d+"):
            subject_dir = os.path.join(base, bucket, subject)
            stems = {name[:-4] if name.endswith(".txt") else name for name in os.listdir(subject_dir)}
            for study in sorted(s for s in stems if re.fullmatch(r"s\d+", s)):
                yield subject, study, os.path.join(subject_dir, study)


def _sorted_names(folder: str, pattern: str) -> list[str]:
    """Sub-folders of ``folder`` whose names match ``pattern``, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and re.fullmatch(pattern, e.name))


def _images(folder: str) -> list[tuple[str, str]]:
    """(dicom_id, path) of the study's images, one per dicom_id, sorted by id."""
    chosen: dict[str, str] = {}
    for name in os.listdir(folder):
        stem, suffix = os.path.splitext(name)
        rank = _PREFERENCE.get(suffix.lower())
        if rank is not None and (stem not in chosen or rank < _PREFERENCE[os.path.splitext(chosen[stem])[1].lower()]):
            chosen[stem] = os.path.join(folder, name)
    return sorted(chosen.items())


def _report_text(path: str, wanted: list[str], placeholder: str) -> tuple[str, str]:
    """The selected sections of the report, or the whole report when it has none of them."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        raw = handle.read()
    text = select_sections(split_sections(raw), wanted, placeholder, headed=True)
    return (text, "sections") if text else (clean_report(raw, placeholder), "whole_report")


def _read_csv(path: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV after checking its file and required columns exist."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such CSV file")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}:1: missing column(s) {', '.join(missing)} (found: {reader.fieldnames})")
        for row in reader:
            yield reader.line_num, row


def _read_views(path: str) -> dict[str, str]:
    """dicom_id -> ViewPosition (PA, AP, LATERAL, ...)."""
    return {row["dicom_id"]: (row["ViewPosition"] or "").strip() for _, row in _read_csv(path, ("dicom_id", "ViewPosition"))}


def _read_labels(path: str) -> dict[str, list[str]]:
    """study id (digits) -> the finding columns equal to 1, in column order."""
    table: dict[str, list[str]] = {}
    for line, row in _read_csv(path, ("study_id",)):
        positive = []
        for column, value in row.items():
            if column in ("subject_id", "study_id") or column is None:
                continue
            value = (value or "").strip()
            try:
                number = float(value) if value else 0.0
            except ValueError:
                raise InputError(f"{path}:{line}: column {column!r} holds {value!r}, expected 1, 0, -1 or blank")
            if number == 1.0:
                positive.append(column)
        table[str(row["study_id"]).strip().lstrip("s")] = positive
    return table
