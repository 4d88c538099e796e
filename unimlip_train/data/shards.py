"""Resolve shard sources (patterns, dirs, index.json, weighted lists) into shard lists with sample counts.

The loader needs exact per-shard sample counts to give every rank and worker the same number of batches
(uneven ranks deadlock collectives). They come from the writer's ``index.json``; without one, each shard is
read once and counted with the very iterator the loader uses, so the counts always match what it yields.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import webdataset as wds

#: The only tar members the loader ever reads. Everything else (``.pyd``, ``.pickle``, ``.pth`` ...) is
#: dropped by name before its bytes are read, so untrusted shard content can never be unpickled.
ALLOWED_SUFFIXES = frozenset({"jpg", "jpeg", "png", "txt", "json"})


@dataclass
class ShardSource:
    """One weighted source: shard URLs and their sample counts (same order)."""

    name: str
    urls: list
    counts: list
    weight: float = 1.0

    @property
    def total(self) -> int:
        return sum(self.counts)


def _allowed_member(fname: str) -> bool:
    return fname.rsplit(".", 1)[-1].lower() in ALLOWED_SUFFIXES


def iter_raw_samples(url: str, handler) -> Iterator[dict]:
    """Yield one shard's samples as undecoded ``{__key__, ext: bytes}`` dicts, allowed members only."""
    return wds.tarfile_samples([{"url": url}], handler=handler, select_files=_allowed_member)


def count_samples(url: str) -> int:
    """Count a shard's samples by reading it (used only when no index.json gives the count)."""
    return sum(1 for _ in iter_raw_samples(url, handler=wds.ignore_and_continue))


def _read_index(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read shard index {path}: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise ValueError(f"{path}: not a shard index (no 'splits' mapping)")
    return index


def _from_index(path: str, split: str, weight: float) -> ShardSource:
    index = _read_index(path)
    splits = index["splits"]
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r} (has: {', '.join(sorted(splits)) or 'none'})")
    root = os.path.dirname(os.path.abspath(path))
    shards = [s for s in splits[split].get("shards", []) if int(s.get("samples", 0)) > 0]
    if not shards:
        raise ValueError(f"{path}: split {split!r} has no non-empty shards")
    urls = [os.path.join(root, s["name"]) for s in shards]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:  # caught here, not as a stream of warnings and silent top-ups in the middle of training
        raise ValueError(f"{path}: {len(missing)} listed shard(s) missing, e.g. {missing[0]}")
    return ShardSource(f"{path}:{split}", urls, [int(s["samples"]) for s in shards], weight)


def _known_counts(urls: list) -> dict:
    """Counts for local shards that an index.json next to them lists (any split)."""
    counts: dict = {}
    for d in {os.path.dirname(os.path.abspath(u)) for u in urls if os.path.exists(u)}:
        index_path = os.path.join(d, "index.json")
        if not os.path.isfile(index_path):
            continue
        for split in _read_index(index_path)["splits"].values():
            for s in split.get("shards", []):
                counts[os.path.join(d, s["name"])] = int(s["samples"])
    return counts


def _from_urls(name: str, urls: list, weight: float) -> ShardSource:
    if not urls:
        raise ValueError(f"{name}: matches no shards")
    known = _known_counts(urls)
    counts = [known.get(os.path.abspath(u)) if os.path.exists(u) else None for u in urls]
    counts = [c if c is not None else count_samples(u) for c, u in zip(counts, urls)]
    kept = [(u, c) for u, c in zip(urls, counts) if c > 0]
    if not kept:
        raise ValueError(f"{name}: every shard is empty")
    return ShardSource(name, [u for u, _ in kept], [c for _, c in kept], weight)


def resolve_source(path: str, split: str = "train", weight: float = 1.0) -> ShardSource:
    """One source from a brace pattern (``a-{000000..000009}.tar``, ``::``-joined), a ``.txt`` shard list,
    a shard directory (its index.json, else ``{split}-*.tar``) or an index.json (+ ``split``)."""
    if not path:
        raise ValueError("empty shard source path")
    if os.path.isdir(path):
        index_path = os.path.join(path, "index.json")
        if os.path.isfile(index_path):
            return _from_index(index_path, split, weight)
        return _from_urls(path, sorted(glob.glob(os.path.join(path, f"{split}-*.tar"))), weight)
    if path.endswith(".json"):
        return _from_index(path, split, weight)
    if path.endswith(".txt") and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        base = os.path.dirname(os.path.abspath(path))
        urls = [u if "://" in u or os.path.isabs(u) else os.path.join(base, u) for u in lines]
        return _from_urls(path, urls, weight)
    urls = wds.shardlists.expand_urls(path)
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise ValueError(f"{path}: shard not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    return _from_urls(path, urls, weight)


def _field(entry: Any, name: str, default: Any) -> Any:
    return entry.get(name, default) if isinstance(entry, dict) else getattr(entry, name, default)


def resolve_sources(spec: Any, split: str = "train") -> list:
    """Sources for ``cfg.data.train``-style specs: a string, or a list of strings / ``{path, weight, split}``."""
    if isinstance(spec, str):
        return [resolve_source(spec, split)]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"shard source must be a path/pattern or a non-empty list of sources, got {spec!r}")
    sources = []
    for entry in spec:
        if isinstance(entry, str):
            sources.append(resolve_source(entry, split))
            continue
        weight = float(_field(entry, "weight", 1.0))
        if weight <= 0:
            raise ValueError(f"shard source {_field(entry, 'path', '')!r}: weight must be > 0, got {weight}")
        sources.append(resolve_source(_field(entry, "path", ""), _field(entry, "split", split), weight))
    return sources
