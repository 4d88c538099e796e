"""Safe decoding of a raw sample, and the choice of which of a study's images it uses.

Decoding reads only image (jpg/png, 8/16-bit), txt and json members: other members (``.pickle``,
``.pyd``...) are never read, so untrusted shards cannot run code. A study sample (json ``views``: several
images of one study) decodes only the images ``data.view`` picks, seeded by (seed, epoch, source, key):
``random`` one of them, ``frontal`` one of its PA/AP images (any when it has none), ``pair`` one for ``image``
and a different one of the same study for ``image_view2`` (when the image SSL term is on; the augmented copy of
the same image when the study has one image). Evaluation reads the first frontal image (else the first).
A sample that cannot be decoded is skipped and counted (``skips.py``), as is the placeholder of a sample its
shard lacks (``raw.MISSING``). The json member is parsed within a size and depth limit and every image's size is
read from its header before it is decoded (``data.max_image_pixels``), so a hostile or broken shard costs a
skipped sample, never a stalled worker (``unimlip_train.format.limits``).
"""
from __future__ import annotations

import random
from typing import Iterator

from unimlip_train.config.schema import DataConfig
from unimlip_train.data.raw import MISSING
from unimlip_train.data.skips import SkipCounter
from unimlip_train.data.transforms import decode_image
from unimlip_train.format.limits import parse_json_member
from unimlip_train.format.rows import is_frontal

_IMAGE_EXTS = ("jpg", "jpeg", "png")


def image_members(raw: dict, meta: dict) -> tuple[list, list]:
    """(member names, view positions) of a sample's images: its json ``views``, else its one jpg/png."""
    views = meta.get("views")
    if isinstance(views, list) and views:
        members = [v.get("member") if isinstance(v, dict) else None for v in views]
        missing = [m for m in members if m not in raw]
        if missing:
            raise ValueError(f"sample {raw.get('__key__')!r}: view member(s) {missing} listed in json but absent")
        return members, [str(v.get("view") or "") for v in views]
    ext = next((e for e in _IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw.get('__key__')!r} has no image (jpg/png)")
    return [ext], [str(meta.get("view") or "")]


def choose_views(positions: list, rule: str, two: bool, rng: random.Random) -> list:
    """Indices of the images a training sample uses (see the module doc); one or, for ``pair``, two."""
    n = len(positions)
    if n == 1:
        return [0]
    if rule == "frontal":
        return [rng.choice([i for i, p in enumerate(positions) if is_frontal(p)] or list(range(n)))]
    first = rng.randrange(n)
    if rule == "pair" and two:
        return [first, rng.choice([i for i in range(n) if i != first])]
    return [first]


def eval_view(positions: list) -> list:
    """The image evaluation reads: the first frontal one, else the first."""
    return [next((i for i, p in enumerate(positions) if is_frontal(p)), 0)]


def decode_sample(raw: dict, in_chans: int, target: int, pick=None, max_pixels: int = 0) -> dict:
    """Images, report and metadata from a raw sample; raises ValueError on anything unusable.

    ``pick(raw, view positions)`` gives the indices of the images to decode (default: the first); they come
    back in ``images``, in that order. An image above ``max_pixels`` (0: no limit) is refused from its header.
    """
    if "txt" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} has no report (txt)")
    meta = parse_json_member(raw["json"]) if "json" in raw else {}
    if not isinstance(meta, dict):
        raise ValueError(f"sample {raw.get('__key__')!r}: json member is not an object")
    members, positions = image_members(raw, meta)
    chosen = pick(raw, positions) if pick is not None else [0]
    return {"key": raw["__key__"], "origin": (raw.get("__source__"), raw.get("__draw__")),
            "images": [decode_image(raw[members[i]], in_chans, target, max_pixels) for i in chosen],
            "text": raw["txt"].decode("utf-8"), "meta": meta}


def decoded(raws: Iterator[dict], handler: SkipCounter, data: DataConfig, counter: dict,
            pick=None) -> Iterator[dict]:
    """Decode, counting raw samples pulled (the resume position) and every sample read or lost (``handler``),
    skipping the undecodable and the placeholders of missing samples."""
    for raw in raws:
        counter["raw"] += 1
        handler.read()
        shard = raw.get("__url__", "?")
        if raw.get(MISSING):
            handler.missing(shard)
            continue
        try:
            yield decode_sample(raw, data.in_chans, data.image_size, pick, data.max_image_pixels)
        except Exception as exn:  # noqa: BLE001 - any decoder error means a corrupt sample: skip it
            handler.skip(shard, raw.get("__key__", "?"), exn)
