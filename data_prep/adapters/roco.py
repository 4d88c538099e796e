"""ROCO style: an image folder plus a captions file (figure captions from PubMed Central, no patient info).

Captions file formats, chosen by suffix:
- ``.csv``: a header with an id column (``id``/``ID``/``image_id``/``name``) and a caption column
  (``caption``/``Caption``/``text``), e.g. ROCOv2's ``train_captions.csv``;
- ``.jsonl``: one object per line with the same keys;
- anything else (ROCO's ``captions.txt``): ``<id><TAB><caption>`` per line, blank lines ignored.
Images are looked up as ``<id>.jpg|.jpeg|.png`` in ``--images``; a missing one is still yielded (as the path it
would have) so the writer records it. group = id, since captions carry no patient. A malformed line or a
duplicate id is an ``InputError`` naming the file and line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator

from unimlip_train.format.rows import InputError, Row

_ID_KEYS = ("id", "image_id", "name")
_CAPTION_KEYS = ("caption", "text")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ROCO inputs."""
    parser.add_argument("--images", required=True, help="folder of the images, named <id>.jpg (or .jpeg/.png)")
    parser.add_argument("--captions", required=True,
                        help="captions file: ROCO captions.txt (<id><TAB><caption>), or .csv / .jsonl with id "
                             "and caption columns")


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    """Yield one row per caption, in file order."""
    if not os.path.isfile(args.captions):
        raise InputError(f"{args.captions}: no such captions file")
    if not os.path.isdir(args.images):
        raise InputError(f"{args.images}: no such image folder")
    images = {os.path.splitext(name)[0]: os.path.join(args.images, name)
              for name in sorted(os.listdir(args.images)) if name.lower().endswith(_IMAGE_SUFFIXES)}
    first_line: dict[str, int] = {}
    for line, sample_id, caption in _captions(args.captions):
        if sample_id in first_line:
            raise InputError(f"{args.captions}:{line}: duplicate id {sample_id!r} (first on line {first_line[sample_id]})")
        first_line[sample_id] = line
        yield Row(
            id=sample_id,
            image=images.get(sample_id, os.path.join(args.images, sample_id + ".jpg")),
            text=" ".join(caption.split()),
            group=sample_id,
            labels=[],
            metadata={"source": "roco", "view": "", "orig_captions": f"{args.captions}:{line}"},
        )


def _captions(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number, id, caption) from any of the supported formats."""
    suffix = os.path.splitext(path)[1].lower()
    with open(path, newline="" if suffix == ".csv" else None, encoding="utf-8") as handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            id_key, caption_key = _columns(path, reader.fieldnames or [])
            for row in reader:
                if row.get(id_key) is None or row.get(caption_key) is None:
                    raise InputError(f"{path}:{reader.line_num}: row has fewer fields than the header")
                yield reader.line_num, _checked_id(path, reader.line_num, row[id_key]), row[caption_key]
            return
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if suffix == ".jsonl":
                yield line, *_json_line(path, line, raw)
            else:
                sample_id, tab, caption = raw.rstrip("\r\n").partition("\t")
                if not tab:
                    raise InputError(f"{path}:{line}: expected '<id><TAB><caption>', found no tab")
                yield line, _checked_id(path, line, sample_id), caption


def _json_line(path: str, line: int, raw: str) -> tuple[str, str]:
    """(id, caption) of one JSONL record."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{line}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}:{line}: expected a JSON object")
    id_key, caption_key = _columns(path, list(record), line)
    caption = record[caption_key]
    if not isinstance(caption, str):
        raise InputError(f"{path}:{line}: {caption_key!r} is not a string")
    return _checked_id(path, line, str(record[id_key])), caption


def _columns(path: str, names: list[str], line: int = 1) -> tuple[str, str]:
    """The actual id and caption column names (case-insensitive), or an InputError listing what was found."""
    lowered = {name.lower(): name for name in names if name}
    id_key = next((lowered[k] for k in _ID_KEYS if k in lowered), None)
    caption_key = next((lowered[k] for k in _CAPTION_KEYS if k in lowered), None)
    if id_key is None or caption_key is None:
        raise InputError(f"{path}:{line}: needs an id column ({'/'.join(_ID_KEYS)}) and a caption column "
                         f"({'/'.join(_CAPTION_KEYS)}); found {names}")
    return id_key, caption_key


def _checked_id(path: str, line: int, sample_id: str) -> str:
    """A non-empty id that can name a file: no path separators."""
    sample_id = sample_id.strip()
    if not sample_id or "/" in sample_id or "\\" in sample_id:
        raise InputError(f"{path}:{line}: invalid id {sample_id!r}")
    return sample_id
