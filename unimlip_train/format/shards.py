"""The shard files both sides agree on: shard names, sample keys, file hashes, the sample json's report hash.

The writer (``data_prep``) produces ``{split}-NNNNNN.tar`` WebDataset shards and an ``index.json`` listing
each shard's sample count, size and sha256; ``unimlip-shard verify``, evaluation cards and ablation records
hash the same files with the same function. A sample is ``KEY.jpg``/``KEY.png`` (study samples add
``KEY.view1.jpg`` ...), ``KEY.txt`` (the report) and ``KEY.json``, whose fields include ``id``, ``group``,
``labels``, ``split``, ``source``, ``orig_path``, ``view``, ``report_hash`` (below), the first image's
``pixel_sha256`` / ``phash`` / ``orig_size``, and for a study ``views``: one entry per image with its
``member``, ``view``, ``name``, ``orig_path`` and hashes.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from unimlip_train.format.report_text import report_body, report_id

SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(sample_id: str) -> str:
    """A webdataset-safe ``__key__``: no dots (webdataset splits names at the first dot), no slashes.

    Ids that are already safe are kept; otherwise the cleaned id gets a hash suffix so different ids
    never collide, and the name (key + ``.json``) fits a plain ustar header.
    """
    clean = _KEY_UNSAFE.sub("_", sample_id)
    if clean == sample_id and 0 < len(sample_id) <= 90:
        return clean
    return f"{clean[:79]}-{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:10]}"


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (a shard, an index.json), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def report_hash(text: str) -> str:
    """The shard json's ``report_hash``: the duplicate rule's 63-bit report id (of the report's body, headers
    aside) as 16 hex digits."""
    return f"{report_id(report_body(text)):016x}"
