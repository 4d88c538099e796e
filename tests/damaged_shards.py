"""Real shards (PneumoniaMNIST X-rays with IU X-ray reports) damaged the ways disks and transfers damage them,
and a naive count of what each damaged shard really lost: the reference the skip accounting is tested against.

The naive side reads each tar with Python's own ``tarfile`` (stream mode, as WebDataset does) and calls a sample
usable when its report is UTF-8, its json an object and its image decodes fully with PIL; nothing of the
project's loader is used.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

from conftest import IU_REPORTS_TGZ, PNEUMONIAMNIST_NPZ
from data_prep.class_pairs import write_class_paired_manifest
from data_prep.cli import main as shard_main


def real_shards(root: Path, per_class: int = 50, shard_size: int = 20) -> Path:
    """``root/shards``: 4 x ``per_class`` real image-report pairs in train shards of ``shard_size``."""
    manifest = write_class_paired_manifest(root, PNEUMONIAMNIST_NPZ, IU_REPORTS_TGZ,
                                           per_class={"train": per_class, "val": per_class})
    out = root / "shards"
    assert shard_main(["manifest", "--manifest", str(manifest), "--out", str(out), "--val-fraction", "0",
                       "--shard-size", str(shard_size), "--max-size", "64", "--workers", "1", "--no-progress",
                       "--no-audit"]) == 0
    return out


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def truncate(path: Path, fraction: float) -> None:
    """Cut the tar after ``fraction`` of its bytes (a copy or a download that stopped)."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def garble_images(path: Path, samples: set[int], seed: int = 0) -> None:
    """Overwrite the image bytes of the ``samples``-th samples (tar order) with noise, the tar intact."""
    data, rng = bytearray(path.read_bytes()), random.Random(seed)
    images = [m for m in _members(path) if m.name.endswith((".jpg", ".png"))]
    for i in samples:
        m = images[i]
        data[m.offset_data:m.offset_data + m.size] = bytes(rng.randrange(256) for _ in range(m.size))
    path.write_bytes(bytes(data))


def garble_header(path: Path, member: int, seed: int = 0) -> None:
    """Overwrite the 512-byte tar header of the ``member``-th member with noise: the tar is unreadable from there."""
    data, rng = bytearray(path.read_bytes()), random.Random(seed)
    offset = _members(path)[member].offset
    data[offset:offset + 512] = bytes(rng.randrange(256) for _ in range(512))
    path.write_bytes(bytes(data))


def _usable(members: dict) -> bool:
    try:
        members["txt"].decode("utf-8")
        if not isinstance(json.loads(members["json"]), dict):
            return False
        image = next(members[e] for e in ("jpg", "png") if e in members)
        with Image.open(io.BytesIO(image)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - anything wrong with it makes it unusable
        return False


def naive_read(path: Path) -> list[tuple[str, bool]]:
    """(key, usable) of each sample a plain stream read of the tar gets, in tar order."""
    samples: list[tuple[str, dict]] = []
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = data
    except (tarfile.TarError, OSError, EOFError):
        pass  # the rest of the tar is lost
    return [(key, _usable(members)) for key, members in samples]


def shard_table(shard_dir: Path) -> dict[str, tuple[int, list[tuple[str, bool]]]]:
    """shard path -> (the index's sample count, ``naive_read``) for every train shard."""
    index = json.loads((shard_dir / "index.json").read_text())
    return {str(shard_dir / s["name"]): (s["samples"], naive_read(shard_dir / s["name"]))
            for s in index["splits"]["train"]["shards"]}


def naive_loss(table: dict) -> dict[str, int]:
    """Samples each shard loses in one full read: the index's count minus the usable samples."""
    return {shard: count - sum(ok for _, ok in read) for shard, (count, read) in table.items()}


def expected_skips(table: dict, epochs: list[list[str]]) -> dict[str, int]:
    """What one unit reading without a shuffle buffer lost, from the keys it delivered in each epoch.

    Such a unit reads whole shards from their first sample, one after another, and decodes only until it has its
    batch: every position a read passed between two delivered samples, and the tail of a shard whose read went
    on to another shard, was lost; the read that an epoch (or the run) ended in lost nothing after its last
    delivered sample."""
    where = {key: (shard, pos) for shard, (_, read) in table.items() for pos, (key, _) in enumerate(read)}
    lost: dict[str, int] = {}

    def passed(shard: str, lo: int, hi: int) -> None:
        count, read = table[shard]
        n = sum(1 for pos in range(lo, hi) if pos >= len(read) or not read[pos][1])
        if n:
            lost[shard] = lost.get(shard, 0) + n

    for keys in epochs:
        current = None
        for key in keys:
            shard, pos = where[key]
            if current and current[0] == shard and pos > current[1]:
                passed(shard, current[1] + 1, pos)
            else:
                if current:
                    passed(current[0], current[1] + 1, table[current[0]][0])
                passed(shard, 0, pos)
            current = (shard, pos)
    return lost


def bomb_png(side: int = 13000) -> bytes:
    """A real decompression bomb: a ``side`` x ``side`` grayscale PNG of zeros (13,000: 169 megapixels in about
    164 KB), under PIL's own limit of 179 megapixels, written row by row so making it costs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rewrite_shard(shard_dir: Path, name: str, edit) -> None:
    """Replace shard ``name``'s samples by ``edit(list of (key, {ext: bytes}))`` and record the new tar in
    index.json (size, sha256, count), so that only its content is wrong."""
    import hashlib

    import webdataset as wds

    from data_prep.verify import iter_samples

    path = shard_dir / name
    samples = edit(list(iter_samples(path)))
    with wds.TarWriter(str(path)) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    index = json.loads((shard_dir / "index.json").read_text())
    for info in index["splits"].values():
        for entry in info["shards"]:
            if entry["name"] == name:
                info["samples"] += len(samples) - entry["samples"]
                entry.update(samples=len(samples), bytes=path.stat().st_size,
                             sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    index["samples"] = sum(info["samples"] for info in index["splits"].values())
    (shard_dir / "index.json").write_text(json.dumps(index))
