"""IU X-ray (Open-I, Indiana University Chest X-ray Collection): report XMLs joined to the PNG folder.

One row per (report, parentImage): both views of a study share the report text and the group (the report id),
so the writer's group-wise split keeps a study in one split.
- text: the ``--sections`` AbstractText sections (default FINDINGS then IMPRESSION), de-identification tokens
  cleaned as documented in ``unimlip_train.format.report_text``; a report without those sections gives rows with empty
  text, which the writer skips and records.
- labels: the MeSH ``major`` tags reduced to their head term ("Cardiomegaly/borderline" -> "Cardiomegaly",
  "Catheters, Indwelling/right" -> "Catheters, Indwelling"), duplicates removed; the full tags are kept in
  metadata ``mesh``.
- view: not derivable (Open-I gives one caption per study, "frontal and lateral"), so it is left empty.
- Reports without any parentImage are skipped here (no image to pair) and counted on stderr.
The archive may be given as the ``.tgz`` itself: members are read in memory, nothing is extracted to disk, and
only regular ``*.xml`` members are considered. ElementTree does not resolve external entities.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from unimlip_train.format.report_text import parse_sections, select_sections
from unimlip_train.format.rows import InputError, Row

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The IU X-ray inputs."""
    parser.add_argument("--reports", required=True,
                        help="folder of Open-I report XMLs (searched recursively, e.g. ecgen-radiology/) or the "
                             "NLMCXR_reports.tgz archive itself (read in memory, not extracted)")
    parser.add_argument("--images", required=True,
                        help="folder of the Open-I images named <parentImage id>.png (or .jpg)")
    parser.add_argument("--sections", type=parse_sections, default=parse_sections("findings,impression"),
                        help="report sections that make the text, in order (default: findings,impression)")
    parser.add_argument("--deid-placeholder", default="",
                        help="text put where XXXX de-identification tokens were (default: remove them)")


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    """Yield one row per (report, image), reports in numeric order."""
    if not os.path.exists(args.reports):
        raise InputError(f"{args.reports}: no such report folder or archive")
    if not os.path.isdir(args.images):
        raise InputError(f"{args.images}: no such image folder")
    # Sorted, so where X.png and X.jpg both exist the same one wins on every file system (the last in order).
    images = {os.path.splitext(name)[0]: os.path.join(args.images, name)
              for name in sorted(os.listdir(args.images)) if name.lower().endswith(_IMAGE_SUFFIXES)}
    reports = rows = without_images = 0
    for name, data in _report_files(args.reports):
        reports += 1
        root = _parse(name, data)
        image_ids = [el.get("id", "") for el in root.iter("parentImage") if el.get("id")]
        if not image_ids:
            without_images += 1
            continue
        sections = {(el.get("Label") or "").lower(): el.text or "" for el in root.iter("AbstractText")}
        text = select_sections(sections, args.sections, args.deid_placeholder, headed=True)
        mesh = [el.text.strip() for el in root.iter("major") if el.text and el.text.strip()]
        labels = list(dict.fromkeys(tag.split("/")[0].strip() for tag in mesh))
        report_id = _report_id(name)
        for image_id in image_ids:
            rows += 1
            yield Row(
                id=image_id,
                image=images.get(image_id, os.path.join(args.images, image_id + ".png")),
                text=text,
                group=report_id,
                labels=labels,
                metadata={"source": "iu-xray", "view": "", "report_id": report_id, "orig_report": name,
                          "mesh": mesh},
            )
    print(f"iu-xray: {reports} reports, {rows} image rows; {without_images} reports without images skipped",
          file=sys.stderr)


def _report_files(path: str) -> Iterator[tuple[str, bytes]]:
    """(display name, XML bytes) for every report, in natural order of the file names."""
    if os.path.isdir(path):
        found = []
        for folder, _, names in os.walk(path):
            found += [os.path.join(folder, n) for n in names if n.lower().endswith(".xml")]
        for file in sorted(found, key=_natural):
            with open(file, "rb") as handle:
                yield file, handle.read()
        return
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: not a report folder or a readable tar archive ({exc})") from exc
    with archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(".xml")]
        for member in sorted(members, key=lambda m: _natural(m.name)):
            handle = archive.extractfile(member)
            yield f"{path}/{member.name}", handle.read()


def _parse(name: str, data: bytes) -> ET.Element:
    """The report's XML root, or an InputError naming the file and line."""
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise InputError(f"{name}:{exc.position[0]}: not well-formed XML ({exc})") from exc


def _report_id(name: str) -> str:
    """The report's file stem ("ecgen-radiology/2.xml" -> "2"), the study's group id."""
    return os.path.splitext(os.path.basename(name))[0]


def _natural(name: str) -> list:
    """Sort key that puts 2.xml before 10.xml."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
