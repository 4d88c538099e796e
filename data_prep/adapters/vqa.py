"""Medical VQA sets as shards: one sample per image (and split) carrying all its question-answer pairs.

The public sets (VQA-RAD, SLAKE) and the manifest form give one record per question; ``pack_rows`` groups them
by (image, split) so an image is decoded once per epoch however many questions it has. A sample's ``json``
holds ``vqa``: the list of ``{qid, question, answer, answer_type (CLOSED / OPEN), ...}`` (every other field of
the source record kept too), and its ``txt`` the pairs as "question answer" lines, so the standard loader and
the shard tools read it like any other set. Official splits are kept (``Row.split``); the group is the image,
so a validation split carved from train never shares an image with it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from unimlip_train.format.rows import InputError, Row

ANSWER_TYPES = ("CLOSED", "OPEN")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def answer_type(value, answer: str, where: str) -> str:
    """CLOSED / OPEN from the record (VQA-RAD writes ``CLOSED ``, some sets lower case); yes/no when absent."""
    text = str(value or "").strip().upper()
    if not text:
        return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"
    if text not in ANSWER_TYPES:
        raise InputError(f"{where}: answer_type {value!r} is neither CLOSED nor OPEN")
    return text


def json_questions(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(where, record) for each question of a JSON list file (VQA-RAD, SLAKE), each checked for ``required``
    fields; a file that is not such a list is an InputError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    for i, r in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(r, dict) or any(k not in r for k in required):
            raise InputError(f"{where}: needs the fields {', '.join(required)}")
        yield where, r


def pack_rows(records: Iterable[tuple[str, dict]], source: str) -> Iterator[Row]:
    """Rows from ``(where, record)`` pairs. A record has ``image`` (path), ``image_name`` (its name in the set),
    ``question``, ``answer``, ``answer_type``, optionally ``split`` ('' = by group hash), ``group`` (default:
    the image), ``image_meta`` (kept in the sample's metadata) and ``skip`` (why the image cannot be used); any
    other field is kept with its question."""
    images: dict[tuple[str, str], dict] = {}
    for where, r in records:
        question, answer = str(r.get("question", "")).strip(), str(r.get("answer", "")).strip()
        if not question or not answer:
            raise InputError(f"{where}: empty question or answer")
        qa = {k: v for k, v in r.items() if k not in ("image", "image_name", "split", "group", "image_meta", "skip")}
        qa.update(question=question, answer=answer, answer_type=answer_type(r.get("answer_type"), answer, where))
        entry = images.setdefault((r["image_name"], r.get("split", "")),
                                  {"image": r["image"], "group": r.get("group") or r["image_name"], "qa": [],
                                   "meta": r.get("image_meta", {}), "skip": r.get("skip", "")})
        entry["qa"].append(qa)
    for (name, split), entry in sorted(images.items()):
        stem = _UNSAFE.sub("-", str(Path(name).with_suffix(""))).strip("-")
        text = "\n".join(f"{qa['question']} {qa['answer']}" for qa in entry["qa"])
        yield Row(id="-".join(p for p in (source, stem, split) if p), image=entry["image"], text=text,
                  group=str(entry["group"]), split=split, skip=entry["skip"],
                  metadata={**entry["meta"], "source": source, "orig_path": name, "vqa": entry["qa"]})
