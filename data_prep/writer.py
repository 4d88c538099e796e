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
- A full disk ends the run with one message (how much is free, about how much more is needed) and no
  temporary files; the finished shards stay journalled, so the same command finishes the job once there is room.
- Study samples (``Row.views``): one sample, several images: the first as ``KEY.jpg``/``KEY.png`` (so every
  one-image reader still finds an image), the others as ``KEY.view1.jpg`` ...; the json's ``views`` lists each
  member with its view position, source and hashes. A view that cannot be decoded is dropped and recorded; the
  sample is skipped only when none is left.
- Every sample's json carries ``pixel_sha256`` and ``phash`` (per view too) and ``report_hash``, and the
  finished set is audited for duplicates and cross-split leaks (``data_prep.audit``) into ``index.json``.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep import audit
from data_prep.images import WINDOWS, ImageError, process_image
from unimlip_train.format.rows import InputError, Row, View
from unimlip_train.format.shards import SHARD_NAME, report_hash, sample_key, sha256_file
from unimlip_train.format.splits import SPLITS, active_splits, assign_groups

TOOL_NAME = "unimlip-shard"
JOURNAL = ".unimlip-shard-journal.jsonl"
_MTIME = 0  # fixed tar header fields: shard bytes must not depend on when or by whom they were written
_BLOCK, _RECORD = 512, 10240


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
    window: str = "auto"
    frame: int = 0
    workers: int = 1
    audit: bool = True

    def content(self) -> dict:
        """Options that change shard bytes (``workers`` and ``audit`` do not)."""
        d = asdict(self)
        d.pop("workers")
        d.pop("audit")
        return d


class OutOfSpace(Exception):
    """The output file system filled up; the message says where, what is free and about what is needed."""


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
    g.add_argument("--window", choices=WINDOWS, default="auto",
                   help="how 16-bit PNG/TIFF values map onto the output range: auto = 0.5..99.5th percentiles "
                        "(default), minmax = the image's min..max, none = as stored; DICOM uses its own window")
    g.add_argument("--frame", type=int, default=0, metavar="K",
                   help="frame of multi-frame DICOM objects to use, 0-based (default 0: the first); the frame "
                        "count is kept in the metadata")
    g.add_argument("--no-audit", action="store_true",
                   help="skip the duplicate / cross-split leak audit of the finished set (unimlip-shard audit)")
    g.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1),
                   help="decode/encode processes (default: CPU count, at most 8); output does not depend on it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace shards in --out made from other inputs or options (default: refuse)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> WriterOptions:
    if args.frame < 0:
        raise InputError(f"--frame {args.frame}: must be >= 0")
    if not 0 <= args.val_fraction < 1 or not 0 <= args.test_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        raise InputError(f"--val-fraction {args.val_fraction} and --test-fraction {args.test_fraction}: "
                         "each must be in [0, 1) and their sum below 1")
    return WriterOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                         shard_size=args.shard_size, shard_bytes=args.shard_bytes, max_size=args.max_size,
                         jpeg_quality=args.jpeg_quality, keep_16bit=args.keep_16bit, window=args.window,
                         frame=args.frame, workers=args.workers, audit=not args.no_audit)


@dataclass
class _Planned:
    key: str
    row: Row
    group: str


def _error(row: Row, key: str, split: str, reason: str) -> dict:
    return {"id": row.id, "key": key, "split": split, "image": row.image, "reason": reason}


def plan(rows: Iterable[Row], options: WriterOptions, progress: bool) -> tuple[dict[str, list[_Planned]], list[dict]]:
    """Fix every row's split and order before any image work; rows with no usable text are dropped here.

    Rows with an official ``split`` keep it (then every row needs one); the others are split by group."""
    seen: dict[str, str] = {}
    kept: list[_Planned] = []
    errors: list[dict] = []
    for row in tqdm(rows, desc="reading rows", unit="row", disable=not progress or None, leave=False):
        key = sample_key(row.id or row.image)
        if row.skip:
            errors.append(_error(row, key, row.split, row.skip))
        elif not isinstance(row.text, str) or not row.text.strip():
            errors.append(_error(row, key, "", "empty report"))
        elif key in seen:
            errors.append(_error(row, key, "", f"duplicate id: same key as id {seen[key]!r}"))
        else:
            seen[key] = row.id
            kept.append(_Planned(key, row, str(row.group) if row.group else key))
    official = {p.row.split for p in kept}
    if official - {""} and "" in official:
        missing = next(p.row.id for p in kept if not p.row.split)
        raise InputError(f"some rows give an official split and some do not (e.g. id {missing!r}): give every row one")
    if official - {""}:
        split_of = {p.key: p.row.split for p in kept}
        names = ["train"] + [s for s in SPLITS[1:] if s in official]
    else:
        by_group = assign_groups((p.group for p in kept), options.seed, options.val_fraction, options.test_fraction)
        split_of = {p.key: by_group[p.group] for p in kept}
        names = active_splits(options.val_fraction, options.test_fraction)
    by_split: dict[str, list[_Planned]] = {s: [] for s in names}
    for p in kept:
        by_split[split_of[p.key]].append(p)
    for items in by_split.values():
        items.sort(key=lambda p: p.key)
    return by_split, errors


def row_views(row: Row) -> list[View]:
    """The images of a row: a study's views, or its one image."""
    return row.views or [View(row.image, str(row.metadata.get("view", "") or ""))]


def image_task(path: str, options: WriterOptions) -> tuple:
    """What one worker needs to encode one image (plain values: SLURM array slices store them as JSON)."""
    return (path, options.max_size, options.jpeg_quality, options.keep_16bit, options.window, options.frame)


def planned_tasks(items: list[_Planned], options: WriterOptions, start: int = 0) -> tuple[list[tuple], list[tuple]]:
    """Encode tasks of rows ``start..`` of one split in order, and each task's (row position, view, views)."""
    tasks, owners = [], []
    for pos in range(start, len(items)):
        views = row_views(items[pos].row)
        for i, view in enumerate(views):
            tasks.append(image_task(view.path, options))
            owners.append((pos, i, len(views)))
    return tasks, owners


def _fingerprint(by_split: dict[str, list[_Planned]], options: WriterOptions) -> str:
    """Identifies the planned output: a journal is only resumed for the same inputs and options."""
    h = hashlib.sha256(json.dumps(options.content(), sort_keys=True).encode())
    for split, items in by_split.items():
        for p in items:
            r = p.row
            rec = [split, p.key, r.id, r.image, r.text, p.group, list(r.labels), r.metadata]
            h.update(json.dumps(rec, sort_keys=True, default=str).encode("utf-8"))
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
    """Worker job: returns ('ok', ext, bytes, metadata) or ('error', reason); never raises for bad images."""
    try:
        ext, data, info = process_image(*task)
        return ("ok", ext, data, info)
    except ImageError as e:
        return ("error", str(e))
    except Exception as e:  # one odd file must not stop a day-long sharding run
        return ("error", f"unexpected {type(e).__name__}: {e}")


def _image_fields(info: dict) -> dict:
    """What the json keeps of an encoded image's metadata (its DICOM view position goes to ``view``)."""
    return {k: v for k, v in info.items() if k != "dicom_view"}


def _sample(p: _Planned, split: str, source: str, results: list[tuple]) -> tuple[list | None, list[dict]]:
    """(tar members or None, error entries) of one row from its images' encode results."""
    views = row_views(p.row)
    ok = [(v, r) for v, r in zip(views, results) if r[0] == "ok"]
    failed = [(v, r[1]) for v, r in zip(views, results) if r[0] == "error"]
    if not ok:
        reason = failed[0][1] if len(failed) == 1 else "no usable image: " + "; ".join(
            f"{v.name or v.path}: {why}" for v, why in failed)
        return None, [_error(p.row, p.key, split, reason)]
    errors = [{**_error(p.row, p.key, split, f"view {v.name or v.path} dropped: {why}"), "image": v.path,
               "dropped_view": True} for v, why in failed]
    meta = dict(p.row.metadata)
    meta.setdefault("source", source)
    meta.setdefault("orig_path", p.row.image)
    first_view, (_, _, _, first_info) = ok[0]
    if not meta.get("view"):
        meta["view"] = first_view.position or first_info.get("dicom_view", "")
    labels = [p.row.labels] if isinstance(p.row.labels, str) else p.row.labels
    meta.update(id=p.row.id, group=p.group, labels=[str(x) for x in labels], split=split,
                report_hash=report_hash(p.row.text.strip()), **_image_fields(first_info))
    members = []
    described = []
    for i, (view, (_, ext, data, info)) in enumerate(ok):
        member = ext if i == 0 else f"view{i}.{ext}"
        members.append((f"{p.key}.{member}", data))
        described.append({"member": member, "view": view.position or info.get("dicom_view", ""),
                          "name": view.name, "orig_path": view.path, **_image_fields(info)})
    if p.row.views:
        meta.update(orig_path=ok[0][0].path, views=described)
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    members += [(f"{p.key}.json", text.encode("utf-8")), (f"{p.key}.txt", p.row.text.strip().encode("utf-8"))]
    return members, errors


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


def _remove_leftovers(out_dir: Path, keep: set[str] | None) -> None:
    """Temporary files of an interrupted run, and shards of an earlier run with other inputs (``keep`` None:
    temporary files only)."""
    ours = {"index.json.tmp", "errors.jsonl.tmp", Path(JOURNAL).with_suffix(".tmp").name}
    for path in out_dir.iterdir():
        if path.name in ours or (path.name.endswith(".tar.tmp") and SHARD_NAME.match(path.name[:-4])):
            path.unlink()
        elif keep is not None and SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()


def _no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
    progress_made = {"bytes": 0, "rows": 0, "left": 0}
    try:
        return _write(rows, out, options, source, args_record, progress, encoder, overwrite, progress_made)
    except Exception as exc:
        if not _no_space(exc):
            raise
        _remove_leftovers(out, keep=None)
        free = shutil.disk_usage(out).free
        per_row = progress_made["bytes"] / max(1, progress_made["rows"])
        need = f"; the rest needs about {_size(per_row * progress_made['left'])} more" if progress_made["rows"] else ""
        raise OutOfSpace(f"no space left on the device of {out} ({_size(free)} free{need}); temporary files removed "
                         "and finished shards kept: free some space and rerun the same command to finish") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _write(rows: Iterable[Row], out: Path, options: WriterOptions, source: str, args_record: dict, progress: bool,
           encoder: Callable[[list[tuple], int], Iterator[tuple]], overwrite: bool, made: dict) -> dict:
    by_split, plan_errors = plan(rows, options, progress)
    journal = _Journal(out, _fingerprint(by_split, options))
    done = journal.load_valid(out, by_split, overwrite)
    _remove_leftovers(out, {e["name"] for es in done.values() for e in es if e["name"]})
    (out / "index.json").unlink(missing_ok=True)  # present again only once this run has finished

    tasks, owners = [], []  # owners[i] = (split, row position in split, view index, views of the row)
    for split, items in by_split.items():
        split_tasks, split_owners = planned_tasks(items, options, done[split][-1]["end"] if done[split] else 0)
        tasks += split_tasks
        owners += [(split, *owner) for owner in split_owners]
    made["left"] = sum(1 for o in owners if o[2] == 0)

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
        row_results: list[tuple] = []
        for (split, pos, view, views), result in zip(owners, results):
            if split != prev_split and prev_split is not None:
                finish_split(prev_split, len(by_split[prev_split]))
            prev_split = split
            bar.update(1)
            row_results.append(result)
            if view + 1 < views:
                continue
            members, errors = _sample(by_split[split][pos], split, source, row_results)
            row_results = []
            made["left"] -= 1
            (current.errors if current is not None else pending).extend(errors)
            if members is None:
                continue
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
            made["bytes"] += size
            made["rows"] += 1
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
    if options.audit:
        index["audit"] = _audit_summary(out, done, progress)
    _write_outputs(out, index, plan_errors, done)
    return index


def _audit_summary(out: Path, done: dict[str, list[dict]], progress: bool) -> dict:
    """The within-set audit of the finished shards, as index.json keeps it (counts, cross-split leaks)."""
    samples = [s for split, entries in done.items() for e in entries if e["name"]
               for s in audit.read_shard(str(out / e["name"]), ".", split)]
    result = audit.audit([samples])
    summary = {k: v for k, v in result["summary"].items() if k != "examples"}
    summary["cross_split"] = [f for f in result["findings"] if f["leak"]][:audit.EXAMPLES]
    return summary


def _build_index(done: dict[str, list[dict]], plan_errors: list[dict], options: WriterOptions, source: str,
                 args_record: dict) -> dict:
    from unimlip_train import __version__

    splits = {}
    for split, entries in done.items():
        shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries if e["name"]]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    recorded = plan_errors + [err for es in done.values() for e in es for err in e["errors"]]
    dropped = sum(1 for err in recorded if err.get("dropped_view"))
    return {
        "format": "unimlip-shards/1",
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(sh["bytes"] for s in splits.values() for sh in s["shards"]),
        "errors": len(recorded) - dropped,  # rows skipped
        "dropped_views": dropped,  # images of study samples that were left out (the sample was kept)
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
