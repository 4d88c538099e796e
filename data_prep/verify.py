"""Check a shard directory against its ``index.json``, and read samples back from shards.

``verify`` answers "can training trust this directory?": every listed shard exists, has the recorded size
and sha256, is a readable tar whose samples each carry an image, a report and JSON metadata, the sample
counts match, and no ``__key__`` appears twice anywhere (duplicates would silently over-weight samples).
Members are only read as bytes; nothing is ever unpickled.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from unimlip_train.format.rows import InputError
from unimlip_train.format.shards import SHARD_NAME, sha256_file

IMAGE_EXTS = ("jpg", "png")


def load_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "index.json"
    if not Path(shard_dir).is_dir():
        raise InputError(f"{shard_dir}: no such directory")
    if not path.is_file():
        raise InputError(f"{path}: missing (not a finished shard directory; rerun the sharding command)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise InputError(f"{path}: no 'splits' mapping")
    return index


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, grouping consecutive members by key like webdataset does."""
    key, sample = None, {}
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
                    yield key, sample
                key, sample = k, {}
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


def _check_sample(key: str, sample: dict[str, bytes], decode: bool) -> list[str]:
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
        meta = json.loads(sample.get("json", b""))
        if not isinstance(meta, dict):
            problems.append(f"{key}: json metadata is not an object")
            meta = {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        problems.append(f"{key}: missing or invalid json metadata")
    views = meta.get("views")
    members = [v.get("member") if isinstance(v, dict) else None for v in views] if isinstance(views, list) else images
    missing = [m for m in members if m not in sample]
    if missing:
        problems.append(f"{key}: study views {missing} listed in its json are not in the shard")
    for member in [m for m in members if m in sample] if decode else []:
        try:
            with Image.open(io.BytesIO(sample[member]), formats=("JPEG", "PNG")) as im:  # never EPS/Ghostscript
                im.load()
        except Exception as e:  # any decoder failure means the loader would skip this sample
            problems.append(f"{key}: image {member} does not decode ({type(e).__name__}: {e})")
    return problems


def verify_dir(shard_dir: str | Path, decode: bool = False, progress: bool = False) -> list[str]:
    """All problems found in ``shard_dir`` (empty list: the directory is sound)."""
    root = Path(shard_dir)
    index = load_index(root)
    problems: list[str] = []
    seen: dict[str, str] = {}
    listed = set()
    shards = [(split, s) for split, info in index["splits"].items() for s in info.get("shards", [])]
    for split, info in index["splits"].items():
        total = sum(s.get("samples", 0) for s in info.get("shards", []))
        if total != info.get("samples"):
            problems.append(f"index.json: split {split} lists {info.get('samples')} samples, its shards sum to {total}")
    for split, entry in tqdm(shards, desc="verifying", unit="shard", disable=not progress or None):
        name = entry.get("name", "")
        listed.add(name)
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, index.json says {entry.get('bytes')}")
        if sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match index.json")
        count = 0
        try:
            for key, sample in iter_samples(path):
                count += 1
                if key in seen:
                    problems.append(f"{name}: duplicate key {key!r} (also in {seen[key]})")
                seen.setdefault(key, name)
                problems.extend(f"{name}: {p}" for p in _check_sample(key, sample, decode))
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
            continue
        if count != entry.get("samples"):
            problems.append(f"{name}: {count} samples, index.json says {entry.get('samples')}")
    for path in sorted(root.iterdir()):
        if SHARD_NAME.match(path.name) and path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in index.json")
        elif path.name.endswith(".tmp"):
            problems.append(f"{path.name}: leftover temporary file of an interrupted run")
    return problems
