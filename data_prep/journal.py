"""The resume journal (``.unimlip-shard-journal.jsonl``): which shards of a run are finished and intact.

Why: a day-long sharding run must survive a kill, a preemption or a full disk. Each finished shard is
appended with its row range, size, sha256 and skipped rows. A rerun keeps the journalled shards whose files
still hash right and continues from the first missing one, so it ends with the same ``index.json`` as an
uninterrupted run. Shard boundaries follow from the (deterministic) encoded sizes, which is why the journal
records each shard's row range rather than recomputing it. The first line holds the plan's fingerprint
(``data_prep.plan.fingerprint``): shards of other inputs or options are never resumed, and never deleted
without ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from unimlip_train.format.rows import InputError
from unimlip_train.format.shards import SHARD_NAME, sha256_file

JOURNAL = ".unimlip-shard-journal.jsonl"


def _intact(out_dir: Path, entry: dict) -> bool:
    path = out_dir / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


class Journal:
    """Append-only record of finished shards; a torn last line (killed mid-write) is ignored."""

    def __init__(self, out_dir: Path, fingerprint: str):
        self.path = out_dir / JOURNAL
        self.fingerprint = fingerprint

    def load_valid(self, out_dir: Path, splits: Iterable[str], overwrite: bool) -> dict[str, list[dict]]:
        """Journalled shards per split, the longest prefix whose files are intact; rewrites the journal.

        Shards this journal does not describe (other inputs or options, or another tool's) are someone's
        data: without ``overwrite`` the run stops rather than delete them."""
        entries: list[dict] = []
        if not self.path.exists() and any(SHARD_NAME.match(p.name) or p.name == "index.json"
                                          for p in out_dir.iterdir()):
            self._refuse_unless(overwrite, "have no journal of this tool's")
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            try:
                header_ok = bool(lines) and json.loads(lines[0]).get("fingerprint") == self.fingerprint
            except json.JSONDecodeError:
                header_ok = False
            if not header_ok:
                self._refuse_unless(overwrite, "were made from other inputs or options")
                tqdm.write(f"{self.path.parent}: --overwrite: replacing shards made from other inputs or options",
                           file=sys.stderr)
            else:
                for line in lines[1:]:
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
        valid: dict[str, list[dict]] = {s: [] for s in splits}
        stopped: set[str] = set()
        for e in entries:
            split = e.get("split")
            if split not in valid or split in stopped:
                continue
            if e.get("shard") != len(valid[split]) or (e["name"] is not None and not _intact(out_dir, e)):
                stopped.add(split)
                continue
            valid[split].append(e)
        self._rewrite([e for es in valid.values() for e in es])
        return valid

    def _refuse_unless(self, overwrite: bool, why: str) -> None:
        if not overwrite:
            raise InputError(f"--out {self.path.parent}: the shards there {why}; choose another --out, or pass "
                             "--overwrite to replace them")

    def _rewrite(self, entries: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for e in entries:
                f.write(json.dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def remove_leftovers(out_dir: Path, keep: set[str] | None) -> None:
    """Temporary files of an interrupted run, and shards of an earlier run with other inputs (``keep`` None:
    temporary files only)."""
    ours = {"index.json.tmp", "errors.jsonl.tmp", Path(JOURNAL).with_suffix(".tmp").name}
    for path in out_dir.iterdir():
        if path.name in ours or (path.name.endswith(".tar.tmp") and SHARD_NAME.match(path.name[:-4])):
            path.unlink()
        elif keep is not None and SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()
