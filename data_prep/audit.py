"""Leakage audit of shard sets: the same image, a near copy of it, the same report, or the same patient/study
in two places where an evaluation would be fooled by it.

What counts (a *finding* is one image / report / group seen in more than one sample):
- identical images: equal ``pixel_sha256`` (sha256 of the decoded stored pixels);
- near-duplicate images: different pixels whose perceptual hashes (``phash``, 64-bit pHash) differ in at most
  ``near_threshold`` bits (resized, re-encoded or re-windowed copies); linked transitively;
- identical reports: equal ``report_hash`` (``unimlip_train.format.shards.report_hash``: the project's one
  duplicate rule, whitespace collapsed and case folded, as evaluation scores duplicates);
- shared groups: one ``group`` (patient / study) in more than one split or set.
A finding's scope is ``within-split``, ``cross-split`` (one set, several splits) or ``cross-set``. It is a *leak*
when it crosses splits of a set, or crosses an audited set and an ``--against`` set (without ``--against``:
any two sets). Shards written before the writer stored these hashes are hashed on the fly, from the same bytes.

Near duplicates are found without comparing all pairs: the 64 bits are cut into ``near_threshold + 1`` chunks,
and two hashes within the threshold agree exactly on at least one chunk (pigeonhole), so only hashes sharing a
chunk value are compared.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data_prep.fingerprint import image_fingerprint
from data_prep.verify import UnreadableShard, iter_samples
from unimlip_train.format.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ContentError,
    check_pixels,
    header_size,
    parse_json_member,
)
from unimlip_train.format.shards import SHARD_NAME, report_hash

KINDS = ("identical_images", "near_duplicate_images", "identical_reports", "shared_groups")
DEFAULT_NEAR_THRESHOLD = 3  # resized / re-encoded copies differ by <= 2 bits; distinct real X-rays by >= 4
EXAMPLES = 20
_IMAGE_EXTS = ("jpg", "jpeg", "png")
_PHASH = re.compile(r"[0-9a-f]{16}")


@dataclass
class Sample:
    set: str
    split: str
    key: str
    group: str
    report: str  # report_hash
    images: list = field(default_factory=list)  # (pixel_sha256, phash) per image


def _image_members(meta: dict, members: dict) -> list[str]:
    """The sample's image member names: its ``views`` (a study sample), else its one jpg/png."""
    views = meta.get("views")
    if isinstance(views, list) and views:
        return [v["member"] for v in views if isinstance(v, dict) and v.get("member") in members]
    first = next((e for e in _IMAGE_EXTS if e in members), None)
    return [first] if first else []


def _stored_hashes(known: dict) -> tuple[str, str] | None:
    """A view's stored (pixel_sha256, phash) when both are well formed (a damaged json's are recomputed)."""
    pixels, phash = known.get("pixel_sha256"), known.get("phash")
    if isinstance(pixels, str) and pixels and isinstance(phash, str) and _PHASH.fullmatch(phash):
        return pixels, phash
    return None


def _from_members(set_name: str, split: str, key: str, members: dict) -> Sample:
    """The sample's identities; ``ContentError`` (or a decoder's error) when its members are unusable."""
    meta = parse_json_member(members["json"]) if "json" in members else {}
    if not isinstance(meta, dict):
        raise ContentError("json metadata is not an object")
    text = members["txt"].decode("utf-8", errors="replace") if "txt" in members else ""
    views = meta.get("views") if isinstance(meta.get("views"), list) else []
    stored = {v.get("member"): v for v in views if isinstance(v, dict) and isinstance(v.get("member"), str)}
    images = []
    for member in _image_members(meta, members):
        hashes = _stored_hashes(stored.get(member) or (meta if member in _IMAGE_EXTS else {}))
        if hashes is None:  # a shard from before the writer stored hashes: decode, within the pixel limit
            data = members[member]
            size = header_size(data)
            if size is None:
                raise ContentError(f"image {member} is neither a readable PNG nor JPEG")
            check_pixels(*size, DEFAULT_MAX_IMAGE_PIXELS, "the pixel limit")
            fp = image_fingerprint(data)
            hashes = fp["pixel_sha256"], fp["phash"]
        images.append(hashes)
    group, stored_report = meta.get("group"), meta.get("report_hash")
    return Sample(set_name, split, key, str(group) if group else key,
                  stored_report if isinstance(stored_report, str) and stored_report else report_hash(text), images)


def read_shard(path: str, set_name: str, split: str, problems: list[str]) -> Iterator[Sample]:
    """The samples of one shard (image bytes are only decoded when a sample lacks stored hashes). A sample that
    cannot be read, and a tar that cannot be read on, is a line in ``problems`` naming the shard and key."""
    name = os.path.basename(path)
    try:
        for key, members in iter_samples(path):
            try:
                yield _from_members(set_name, split, key, members)
            except Exception as e:  # noqa: BLE001 - any damage to one sample: it is named, not audited
                problems.append(f"{name}: {key}: not audited ({type(e).__name__}: {e})")
    except UnreadableShard as e:
        problems.append(f"{e}; the rest of the shard is not audited")
    except OSError as e:  # a listed shard that is missing or cannot be opened
        problems.append(f"{name}: not audited ({type(e).__name__}: {e})")


def read_set(folder: str, problems: list[str], progress: bool = False) -> list[Sample]:
    """Every readable sample of a shard set (a folder with ``index.json``, or ``index.json`` itself); what cannot
    be read is a line in ``problems``."""
    index_path = folder if folder.endswith(".json") else os.path.join(folder, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        splits = index["splits"]
        shards = [(split, s["name"]) for split, info in splits.items() for s in info.get("shards", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{index_path}: not a readable shard index ({type(e).__name__}: {e})") from None
    root, name = os.path.dirname(os.path.abspath(index_path)), os.path.normpath(folder)
    samples: list[Sample] = []
    for split, shard in tqdm(shards, desc=f"reading {name}", unit="shard", disable=not progress or None, leave=False):
        if not isinstance(shard, str) or not SHARD_NAME.match(shard):  # a listed '../x' is never opened
            problems.append(f"{index_path}: listed shard {shard!r} is not a shard name; not audited")
            continue
        samples.extend(read_shard(os.path.join(root, shard), name, split, problems))
    return samples


def _near_pairs(phashes: list[str], threshold: int) -> Iterator[tuple[int, int]]:
    """Index pairs of hashes within ``threshold`` bits (multi-index hashing, see the module doc)."""
    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    seen: set[tuple[int, int]] = set()
    for bits in np.array_split(np.arange(64, dtype=np.uint64), threshold + 1):
        mask = np.uint64(sum(1 << int(b) for b in bits))
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, chunk in enumerate(values & mask):
            buckets[int(chunk)].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            idx = np.array(members)
            for row in range(len(idx) - 1):  # one row at a time: memory stays linear in the bucket size
                close = np.bitwise_count(values[idx[row + 1:]] ^ values[idx[row]]) <= threshold
                for j in idx[row + 1:][close]:
                    pair = (int(idx[row]), int(j))
                    if pair not in seen:
                        seen.add(pair)
                        yield pair


class _Union:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def audit(sets: list[list[Sample]], against: list[list[Sample]] | None = None,
          near_threshold: int = DEFAULT_NEAR_THRESHOLD) -> dict:
    """Findings and counts over ``sets`` (and ``against``); see the module doc for what counts as a leak."""
    against = against or []
    audited = {s.set for samples in sets for s in samples}
    reference = {s.set for samples in against for s in samples}
    everything = [s for samples in sets + against for s in samples]

    def finding(kind: str, value: str, members: list[Sample]) -> dict | None:
        places = {(m.set, m.split) for m in members}
        names = {m.set for m in members}
        scope = "cross-set" if len(names) > 1 else "cross-split" if len(places) > 1 else "within-split"
        if kind == "shared_groups" and scope == "within-split":
            return None  # a patient's several samples in one split: expected
        leak = scope == "cross-split" or (scope == "cross-set" and (
            bool(names & audited) and bool(names & reference) if against else True))
        return {"kind": kind, "value": value, "scope": scope, "leak": leak,
                "samples": [{"set": m.set, "split": m.split, "key": m.key} for m in members]}

    by_pixels: dict[str, list[Sample]] = defaultdict(list)
    phash_of: dict[str, str] = {}
    by_report: dict[str, list[Sample]] = defaultdict(list)
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in everything:
        for pixels, phash in dict.fromkeys(s.images):
            by_pixels[pixels].append(s)
            phash_of[pixels] = phash
        by_report[s.report].append(s)
        by_group[s.group].append(s)

    findings = []
    for kind, table in (("identical_images", by_pixels), ("identical_reports", by_report)):
        findings += [finding(kind, value, members) for value, members in table.items() if len(members) > 1]
    findings += [finding("shared_groups", g, members) for g, members in by_group.items()
                 if len({(m.set, m.split) for m in members}) > 1]
    distinct = list(phash_of)
    union = _Union(len(distinct))
    for a, b in _near_pairs([phash_of[p] for p in distinct], near_threshold):
        union.join(a, b)
    clusters: dict[int, list[str]] = defaultdict(list)
    for i, pixels in enumerate(distinct):
        clusters[union.find(i)].append(pixels)
    for members in clusters.values():
        if len(members) > 1:
            samples = list({id(s): s for p in members for s in by_pixels[p]}.values())
            findings.append(finding("near_duplicate_images", ",".join(phash_of[p] for p in members), samples))
    findings = [f for f in findings if f is not None]
    findings.sort(key=lambda f: (KINDS.index(f["kind"]), not f["leak"], f["value"]))
    counts = {kind: sum(f["kind"] == kind for f in findings) for kind in KINDS}
    summary = {**counts, "leaks": sum(f["leak"] for f in findings),
               "leaks_by_kind": {kind: sum(f["kind"] == kind and f["leak"] for f in findings) for kind in KINDS},
               "samples": len(everything), "images": len(by_pixels), "near_threshold": near_threshold,
               "examples": {kind: [_example(f) for f in findings if f["kind"] == kind][:EXAMPLES] for kind in KINDS}}
    return {"summary": summary, "findings": findings}


def _example(f: dict) -> dict:
    """A finding for the summary line: its first few samples only (a boilerplate report can be in thousands)."""
    return {**f, "count": len(f["samples"]), "samples": f["samples"][:5]}


def table(summary: dict, findings: list[dict]) -> str:
    """The human-readable table: one line per kind, by scope, and the leaks."""
    scopes = ("within-split", "cross-split", "cross-set")
    lines = [f"{'':24}{'total':>8}" + "".join(f"{s:>14}" for s in scopes) + f"{'leaks':>8}"]
    for kind in KINDS:
        mine = [f for f in findings if f["kind"] == kind]
        lines.append(f"{kind:24}{len(mine):>8}" + "".join(f"{sum(f['scope'] == s for f in mine):>14}" for s in scopes)
                     + f"{sum(f['leak'] for f in mine):>8}")
    return "\n".join(lines)
