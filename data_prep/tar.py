"""One ``{split}-NNNNNN.tar`` shard file, written so its bytes depend only on what goes into it.

Why: determinism and safe resumption. Tar headers carry a fixed mtime, owner and mode, so the same samples
give the same bytes on any machine, at any time, by any user. A shard is written under ``NAME.tmp``, closed
and fsynced, and only renamed to its final name after its journal entry is written (``data_prep.journal``),
so every final-named shard is one a rerun can keep. Sizes are computed from the tar layout (512-byte blocks,
10240-byte records) so a shard closes before it would pass ``--shard-bytes``.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from data_prep.options import WriterOptions
from unimlip_train.format.shards import sha256_file

_MTIME = 0  # fixed tar header fields: shard bytes must not depend on when or by whom they were written
_BLOCK, _RECORD = 512, 10240


def tar_size(payload: int) -> int:
    """File size of a tar whose members take ``payload`` bytes (end-of-archive blocks, record padding)."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD


def member_size(data: bytes) -> int:
    """Bytes one member with ``data`` takes in a tar: its header block and its padded data."""
    return _BLOCK + -(-len(data) // _BLOCK) * _BLOCK


class ShardFile:
    """One shard being written under a temporary name."""

    def __init__(self, out_dir: Path, split: str, index: int, start: int):
        self.split, self.index, self.start = split, index, start
        self.name = f"{split}-{index:06d}.tar"
        self.final = out_dir / self.name
        self.tmp = out_dir / (self.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.payload = 0
        self.errors: list[dict] = []

    def fits(self, size: int, options: WriterOptions) -> bool:
        if self.samples == 0:
            return True
        return self.samples < options.shard_size and tar_size(self.payload + size) <= options.shard_bytes

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
            self.payload += member_size(data)
        self.samples += 1

    def close(self, end: int) -> dict:
        """Finish the tar (still under its temporary name) and return its journal entry."""
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        return {"split": self.split, "shard": self.index, "name": self.name, "start": self.start, "end": end,
                "samples": self.samples, "bytes": self.tmp.stat().st_size, "sha256": sha256_file(self.tmp),
                "errors": self.errors}

    def publish(self) -> None:
        """Give the shard its final name: only after its journal entry, so every final-named shard is one a
        rerun keeps (a kill in between leaves a journal entry whose file is missing: that shard is redone)."""
        os.replace(self.tmp, self.final)

    def abandon(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)
