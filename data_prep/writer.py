"""The shard writer: rows -> ``{split}-NNNNNN.tar`` WebDataset shards + ``index.json`` + ``errors.jsonl``.

Why it is built this way:
- Determinism: every row's split and position is fixed before any image is decoded (splits by a seeded
  SHA-256 of the group, rows sorted by key within a split); tar headers carry fixed mtime/owner; images are
  encoded by deterministic codecs. The same inputs and options give byte-identical shards for any
  ``--workers``.
- Parallelism: a process pool decodes/resizes/encodes (``Pool.imap`` keeps input order); only the parent
  writes tars, in order.
- Resumability: a shard is written to ``NAME.tmp`` and renamed when complete, then appended to a journal
  (``.unimlip-shard-journal.jsonl``) with its row range, size, sha256 and skipped rows. A rerun keeps the
  journalled shards whose files still hash right and continues from the first missing one, so it ends with
  the same ``index.json`` as an uninterrupted run. Shard boundaries follow from the (deterministic) encoded
  sizes, which is why the journal records each shard's row range rather than recomputing it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.images import ImageError, process_image
from data_prep.rows import InputError, Row
from data_prep.splits import SPLITS, active_splits, assign_groups

TOOL_NAME = "unimlip-shard"
JOURNAL = ".unimlip-shard-journal.jsonl"
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_MTIME = 0  # fixed tar header fields: shard bytes must not depend on when or by whom they were written
_BLOCK, _RECORD = 512, 10240
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class WriterOptions:
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    shard_size: int = 1000
    shard_bytes: int = 1_000_000_000
    max_size: int = 512
    jpeg_quality: int = 95
    keep_16bit: bool = False
    workers: int = 1

    def content(self) -> dict:
        """Options that change shard bytes (``workers`` does not)."""
        d = asdict(self)
        d.pop("workers")
        return d


def parse_bytes(text: str) -> int:
    """Parse a size such as ``1000000``, ``512M`` or ``1G`` (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000000, 512M, 1G)")
    return int(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_writer_arguments(parser: argparse.ArgumentParser, val_fraction: float = 0.05) -> None:
    """Options shared by every sharding subcommand."""
    g = parser.add_argument_group("shard writer")
    g.add_argument("--out", required=True, help="output directory for shards, index.json and errors.jsonl")
    g.add_argument("--seed", type=int, default=0, help="seed of the group-based split (default 0)")
    g.add_argument("--val-fraction", type=float, default=val_fraction,
                   help=f"fraction of groups (patients) held out for validation (default {val_fraction})")
    g.add_argument("--test-fraction", type=float, default=0.0, help="fraction of groups held out for test (default 0)")
    g.add_argument("--shard-size", type=_positive, default=1000, help="max samples per shard (default 1000)")
    g.add_argument("--shard-bytes", type=parse_bytes, default=1_000_000_000,
                   help="max bytes per shard, e.g. 512M or 1G (default 1000000000)")
    g.add_argument("--max-size", type=_positive, default=512,
                   help="resize so the long side is at most PX (default 512)")
    g.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="Q",
                   help="JPEG quality 1-100 for 8-bit images (default 95)")
    g.add_argument("--keep-16bit", action="store_true",
                   help="store 16-bit sources (DICOM, 16-bit PNG) as 16-bit PNG instead of mapping them to 8 bits")
    g.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1),
                   help="decode/encode processes (default: CPU count, at most 8); output does not depend on it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace shards in --out made from other inputs or options (default: refuse)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> WriterOptions:
    if not 0 <= args.val_fraction < 1 or not 0 <= args.test_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        raise InputError(f"--val-fraction {args.val_fraction} and --test-fraction {args.test_fraction}: "
                         "each must be in [0, 1) and their sum below 1")
    return WriterOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                         shard_size=args.shard_size, shard_bytes=args.shard_bytes, max_size=args.max_size,
                         jpeg_quality=args.jpeg_quality, keep_16bit=args.keep_16bit, workers=args.workers)


def sample_key(sample_id: str) -> str:
    """A webdataset-safe ``__key__``: no dots (webdataset splits names at the first dot), no slashes.

    Ids that are already safe are kept; otherwise the cleaned id gets a hash suffix so different ids
    never collide, and the name (key + ``.json``) fits a plain ustar header.
    """
    clean = _KEY_UNSAFE.sub("_", sample_id)
    if clean == sample_id and 0 < len(sample_id) <= 90:
        return clean
    return f"{clean[:79]}-{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:10]}"


@dataclass
class _Planned:
    key: str
    row: Row
    group: str


def _error(row: Row, key: str, split: str, reason: str) -> dict:
    return {"id": row.id, "key": key, "split": split, "image": row.image, "reason": reason}


def plan(rows: Iterable[Row], options: WriterOptions, progress: bool) -> tuple[dict[str, list[_Planned]], list[dict]]:
    """Fix every row's split and order before any image work; rows with no usable text are dropped here."""
    seen: dict[str, str] = {}
    kept: list[_Planned] = []
    errors: list[dict] = []
    for row in tqdm(rows, desc="reading rows", unit="row", disable=not progress or None, leave=False):
        key = sample_key(row.id or row.image)
        if not isinstance(row.text, str) or not row.text.strip():
            errors.append(_error(row, key, "", "empty report"))
        elif key in seen:
            errors.append(_error(row, key, "", f"duplicate id: same key as id {seen[key]!r}"))
        else:
            seen[key] = row.id
            kept.append(_Planned(key, row, str(row.group) if row.group else key))
    hashed = [p for p in kept if not p.row.split]  # rows without an official split: split by group hash
    split_of = assign_groups((p.group for p in hashed), options.seed, options.val_fraction, options.test_fraction)
    by_split: dict[str, list[_Planned]] = (
        {s: [] for s in active_splits(options.val_fraction, options.test_fraction)} if hashed or not kept else {})
    for p in kept:
        if p.row.split and p.row.split not in SPLITS:
            raise InputError(f"row {p.row.id!r}: split {p.row.split!r} is not one of {', '.join(SPLITS)}")
        by_split.setdefault(p.row.split or split_of[p.group], []).append(p)
    for items in by_split.values():
        items.sort(key=lambda p: p.key)
    return {s: by_split[s] for s in SPLITS if s in by_split}, errors


def _fingerprint(by_split: dict[str, list[_Planned]], options: WriterOptions) -> str:
    """Identifies the planned output: a journal is only resumed for the same inputs and options."""
    h = hashlib.sha256(json.dumps(options.content(), sort_keys=True).encode())
    for split, items in by_split.items():
        for p in items:
            r = p.row
            rec = [split, p.key, r.id, r.image, r.text, p.group, list(r.labels), r.metadata]
            h.update(json.dumps(rec, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tar_size(payload: int) -> int:
    """File size of a tar whose members take ``payload`` bytes (end-of-archive blocks, record padding)."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD


def _member_size(data: bytes) -> int:
    return _BLOCK + -(-len(data) // _BLOCK) * _BLOCK


class _ShardFile:
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
        return self.samples < options.shard_size and _tar_size(self.payload + size) <= options.shard_bytes

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
            self.payload += _member_size(data)
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


def _intact(out_dir: Path, entry: dict) -> bool:
    path = out_dir / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


class _Journal:
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


def _encode_task(task: tuple) -> tuple:
    """Worker job: returns ('ok', ext, bytes, orig_size) or ('error', reason); never raises for bad images."""
    path, max_size, quality, keep_16bit = task
    try:
        ext, data, orig = process_image(path, max_size, quality, keep_16bit)
        return ("ok", ext, data, orig)
    except ImageError as e:
        return ("error", str(e))
    except Exception as e:  # one odd file must not stop a day-long sharding run
        return ("error", f"unexpected {type(e).__name__}: {e}")


def _metadata(p: _Planned, split: str, source: str, orig: list[int]) -> dict:
    meta = dict(p.row.metadata)
    meta.setdefault("source", source)
    meta.setdefault("orig_path", p.row.image)
    meta.setdefault("view", "")
    labels = [p.row.labels] if isinstance(p.row.labels, str) else p.row.labels
    meta.update(id=p.row.id, group=p.group, labels=[str(x) for x in labels], orig_size=orig, split=split)
    return meta


def encode_results(tasks: list[tuple], workers: int) -> Iterator[tuple]:
    """Encoded results in task order, from a process pool or inline for one worker.

    The default ``encoder`` of ``write_shards``; a SLURM array replays results its tasks computed instead.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tqdm, torch)
    # Ctrl-C is handled by the parent, which terminates the pool; workers would only print tracebacks.
    with ctx.Pool(min(workers, len(tasks)), initializer=signal.signal,
                  initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        yield from pool.imap(_encode_task, tasks, chunksize=4)


def _remove_leftovers(out_dir: Path, keep: set[str]) -> None:
    """Temporary files of an interrupted run, and shards of an earlier run with other inputs."""
    ours = {"index.json.tmp", "errors.jsonl.tmp", Path(JOURNAL).with_suffix(".tmp").name}
    for path in out_dir.iterdir():
        if path.name in ours or (path.name.endswith(".tar.tmp") and SHARD_NAME.match(path.name[:-4])):
            path.unlink()
        elif SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()


def write_shards(rows: Iterable[Row], out_dir: str | os.PathLike, options: WriterOptions, source: str,
                 args_record: dict, progress: bool = True,
                 encoder: Callable[[list[tuple], int], Iterator[tuple]] = encode_results,
                 overwrite: bool = False) -> dict:
    """Shard ``rows`` into ``out_dir``; returns the index (also written to ``out_dir/index.json``).
    A rerun with the same inputs finishes what is missing; ``overwrite`` lets it replace other shards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    by_split, plan_errors = plan(rows, options, progress)
    journal = _Journal(out, _fingerprint(by_split, options))
    done = journal.load_valid(out, by_split, overwrite)
    _remove_leftovers(out, {e["name"] for es in done.values() for e in es if e["name"]})
    (out / "index.json").unlink(missing_ok=True)  # present again only once this run has finished

    tasks, owners = [], []  # owners[i] = (split, row position in split)
    for split, items in by_split.items():
        start = done[split][-1]["end"] if done[split] else 0
        for pos in range(start, len(items)):
            tasks.append((items[pos].row.image, options.max_size, options.jpeg_quality, options.keep_16bit))
            owners.append((split, pos))

    current: _ShardFile | None = None
    pending: list[dict] = []  # skipped rows of the split before its first written sample

    def finish_split(split: str, end: int) -> None:
        nonlocal current, pending
        shard = current
        if shard is not None:
            entry = shard.close(end)
        else:  # the remaining rows of this split were all skipped: record them without a shard
            start = done[split][-1]["end"] if done[split] else 0
            entry = {"split": split, "shard": len(done[split]), "name": None, "start": start,
                     "end": end, "samples": 0, "bytes": 0, "sha256": None, "errors": pending}
        journal.append(entry)
        if shard is not None:
            shard.publish()
        done[split].append(entry)
        current, pending = None, []

    bar = tqdm(total=len(tasks), desc=f"sharding -> {out}", unit="img", disable=not progress or None)
    results = encoder(tasks, options.workers)
    try:
        prev_split = None
        for (split, pos), result in zip(owners, results):
            if split != prev_split and prev_split is not None:
                finish_split(prev_split, len(by_split[prev_split]))
            prev_split = split
            p = by_split[split][pos]
            bar.update(1)
            if result[0] == "error":
                (current.errors if current is not None else pending).append(_error(p.row, p.key, split, result[1]))
                continue
            _, ext, data, orig = result
            meta = json.dumps(_metadata(p, split, source, orig), sort_keys=True, ensure_ascii=False, default=str)
            members = [(f"{p.key}.{ext}", data), (f"{p.key}.json", meta.encode("utf-8")),
                       (f"{p.key}.txt", p.row.text.strip().encode("utf-8"))]
            size = sum(_member_size(d) for _, d in members)
            if current is not None and not current.fits(size, options):
                entry = current.close(pos)
                journal.append(entry)
                current.publish()
                done[split].append(entry)
                current = None
            if current is None:
                start = done[split][-1]["end"] if done[split] else 0
                current = _ShardFile(out, split, len(done[split]), start)
                current.errors, pending = pending, []
            current.add(members)
        if prev_split is not None:
            finish_split(prev_split, len(by_split[prev_split]))
    except BaseException:
        if current is not None:
            current.abandon()
        raise
    finally:
        results.close()  # stops the pool now, also on Ctrl-C
        bar.close()

    index = _build_index(done, plan_errors, options, source, args_record)
    _write_outputs(out, index, plan_errors, done)
    return index


def _build_index(done: dict[str, list[dict]], plan_errors: list[dict], options: WriterOptions, source: str,
                 args_record: dict) -> dict:
    from unimlip_train import __version__

    splits = {}
    for split, entries in done.items():
        shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries if e["name"]]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    n_errors = len(plan_errors) + sum(len(e["errors"]) for es in done.values() for e in es)
    return {
        "format": "unimlip-shards/1",
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(sh["bytes"] for s in splits.values() for sh in s["shards"]),
        "errors": n_errors,
        "options": options.content(),
        "tool": {"name": TOOL_NAME, "version": __version__, "command": source, "args": args_record},
    }


def _write_outputs(out: Path, index: dict, plan_errors: list[dict], done: dict[str, list[dict]]) -> None:
    """``errors.jsonl`` then ``index.json`` (last: its presence means the run finished), both atomically."""
    lines = [json.dumps(e, ensure_ascii=False) for e in plan_errors]
    lines += [json.dumps(err, ensure_ascii=False) for es in done.values() for e in es for err in e["errors"]]
    for name, text in (("errors.jsonl", "".join(line + "\n" for line in lines)),
                       ("index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
