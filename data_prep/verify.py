"""Check a shard directory against its ``index.json``, and read samples back from shards.

``verify`` answers "can training trust this directory?": every listed shard exists, has the recorded size
and sha256, is a readable tar whose samples each carry an image, a report and JSON metadata, the sample
counts match, and no ``__key__`` appears twice anywhere (duplicates would silently over-weight samples).
Every problem names its shard and, for a sample's problem, the sample's key; ``Report`` counts the bad samples
per shard the way training counts the samples it loses (a sample with a problem, or one the index lists that
the tar does not hold), so the two numbers can be compared. Members are only read as bytes (nothing is ever
unpickled), json within the limits training uses and, with ``decode``, images only up to ``max_pixels`` read
from their headers (``unimlip_train.format.limits``): no shard content makes it fail with a traceback.
"""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from unimlip_train.format.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ContentError,
    check_pixels,
    header_size,
    parse_json_member,
)
from unimlip_train.format.rows import InputError
from unimlip_train.format.shards import SHARD_NAME, sha256_file

IMAGE_EXTS = ("jpg", "png")


class UnreadableShard(Exception):
    """A tar that cannot be read (on): the message names the shard, how far reading got and why."""


def load_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "index.json"
    if not Path(shard_dir).is_dir():
        raise InputError(f"{shard_dir}: no such directory")
    if not path.is_file():
        raise InputError(f"{path}: missing (not a finished shard directory; rerun the sharding command)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise InputError(f"{path}: no 'splits' mapping")
    return index


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, grouping consecutive members by key like webdataset does.

    A tar that cannot be read on (truncated, a garbled header, not a tar at all) raises ``UnreadableShard``
    after the samples read before the damage; the sample being read when it broke is yielded incomplete."""
    key, sample, count = None, {}, 0
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                prefix = member.name[: len(member.name) - len(base)]
                if "." not in base:
                    continue
                k, ext = base.split(".", 1)
                k = prefix + k
                if k != key:
                    if key is not None:
                        count += 1
                        yield key, sample
                    key, sample = k, {}
                sample[ext] = tar.extractfile(member).read()
    except Exception as e:  # tarfile, zlib, lzma ... each raise their own types for a damaged file
        if key is not None:
            yield key, sample
        after = f"after {count + (key is not None)} sample(s), the last {key!r}" if key else "before any sample"
        raise UnreadableShard(f"{Path(tar_path).name}: unreadable tar {after} ({type(e).__name__}: {e})") from None
    if key is not None:
        yield key, sample


def _decode_problem(data: bytes, max_pixels: int) -> str:
    """'' when a JPEG/PNG image decodes fully within ``max_pixels``, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours to decide, from the header
            with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:  # never EPS/Ghostscript
                check_pixels(*(header_size(data) or im.size), max_pixels, "--max-pixels")
                im.load()
    except Exception as e:  # any decoder failure means the loader would skip this sample
        return f"{type(e).__name__}: {e}"
    return ""


def _check_sample(key: str, sample: dict[str, bytes], decode: bool, max_pixels: int) -> list[str]:
    problems = []
    images = [e for e in IMAGE_EXTS if e in sample]
    if len(images) != 1:
        problems.append(f"{key}: expected one image member (jpg or png), found {sorted(sample)}")
    if "txt" not in sample:
        problems.append(f"{key}: no txt member")
    else:
        try:
            if not sample["txt"].decode("utf-8").strip():
                problems.append(f"{key}: empty txt")
        except UnicodeDecodeError:
            problems.append(f"{key}: txt is not UTF-8")
    meta: dict = {}
    try:
        meta = parse_json_member(sample["json"]) if "json" in sample else None
        if not isinstance(meta, dict):
            problems.append(f"{key}: " + ("no json member" if meta is None else "json metadata is not an object"))
            meta = {}
    except ContentError as e:
        problems.append(f"{key}: {e}")
    views = meta.get("views")
    members = [v.get("member") if isinstance(v, dict) else None for v in views] if isinstance(views, list) else images
    missing = [m for m in members if m not in sample]
    if missing:
        problems.append(f"{key}: study views {missing} listed in its json are not in the shard")
    for member in [m for m in members if m in sample] if decode else []:
        if why := _decode_problem(sample[member], max_pixels):
            problems.append(f"{key}: image {member} does not decode ({why})")
    return problems


@dataclass
class Report:
    """What ``verify_dir`` found: every problem (one line each, naming shard and key), and the bad samples per
    shard (a sample with a problem, or listed in the index but not in its tar), as training would lose them."""

    problems: list = field(default_factory=list)
    bad_by_shard: dict = field(default_factory=dict)
    shards: int = 0
    samples: int = 0  # listed in index.json
    samples_read: int = 0

    def bad(self, shard: str, n: int = 1) -> None:
        if n > 0:
            self.bad_by_shard[shard] = self.bad_by_shard.get(shard, 0) + n

    def summary(self, decode: bool) -> dict:
        """The JSON line ``unimlip-shard verify`` ends with."""
        return {"bad_samples": sum(self.bad_by_shard.values()), "bad_by_shard": dict(sorted(self.bad_by_shard.items())),
                "shards": self.shards, "samples": self.samples, "samples_read": self.samples_read,
                "problems": len(self.problems), "decoded": decode}


def _verify_shard(path: Path, entry: dict, seen: dict, decode: bool, max_pixels: int, report: Report) -> None:
    name = path.name
    if path.stat().st_size != entry.get("bytes"):
        report.problems.append(f"{name}: {path.stat().st_size} bytes, index.json says {entry.get('bytes')}")
    if sha256_file(path) != entry.get("sha256"):
        report.problems.append(f"{name}: sha256 does not match index.json")
    count, last = 0, None
    try:
        for key, sample in iter_samples(path):
            count, last = count + 1, key
            problems = _check_sample(key, sample, decode, max_pixels)
            if key in seen:
                problems.append(f"{key}: duplicate key (also in {seen[key]})")
            seen.setdefault(key, name)
            report.problems.extend(f"{name}: {p}" for p in problems)
            report.bad(name, bool(problems))
    except UnreadableShard as e:
        report.problems.append(str(e))
    report.samples_read += count
    listed = entry.get("samples")
    if isinstance(listed, int) and count < listed:
        report.problems.append(f"{name}: {listed - count} sample(s) missing: the tar ends after {count} "
                               f"(the last {last!r}), index.json says {listed}")
        report.bad(name, listed - count)
    elif count != listed:
        report.problems.append(f"{name}: {count} samples, index.json says {listed}")


def verify_dir(shard_dir: str | Path, decode: bool = False, progress: bool = False,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Report:
    """Every problem found in ``shard_dir`` and the bad samples per shard (no problems: the directory is sound)."""
    root = Path(shard_dir)
    index = load_index(root)
    report = Report()
    seen: dict[str, str] = {}
    listed = set()
    shards = [(split, s) for split, info in index["splits"].items() for s in info.get("shards", [])
              if isinstance(s, dict)]
    for split, info in index["splits"].items():
        total = sum(s.get("samples", 0) for s in info.get("shards", []))
        if total != info.get("samples"):
            report.problems.append(f"index.json: split {split} lists {info.get('samples')} samples, its shards sum "
                                   f"to {total}")
    for split, entry in tqdm(shards, desc="verifying", unit="shard", disable=not progress or None):
        name = str(entry.get("name", ""))
        listed.add(name)
        report.shards += 1
        report.samples += entry.get("samples", 0) if isinstance(entry.get("samples"), int) else 0
        path = root / name
        if not SHARD_NAME.match(name) or not path.is_file():  # a listed '../x' is never opened
            report.problems.append(f"{name}: " + ("missing" if SHARD_NAME.match(name) else "not a shard name"))
            report.bad(name, entry.get("samples", 0) if isinstance(entry.get("samples"), int) else 0)
            continue
        _verify_shard(path, entry, seen, decode, max_pixels, report)
    for path in sorted(root.iterdir()):
        if SHARD_NAME.match(path.name) and path.name not in listed:
            report.problems.append(f"{path.name}: shard file not listed in index.json")
        elif path.name.endswith(".tmp"):
            report.problems.append(f"{path.name}: leftover temporary file of an interrupted run")
    return report
