"""The shard writer: rows -> ``{split}-NNNNNN.tar`` WebDataset shards + ``index.json`` + ``errors.jsonl``.

``write_shards`` strings the stages together, each in its own module with the reasons it is built so:
``data_prep.plan`` fixes every row's split and order (determinism), ``data_prep.journal`` keeps what a
rerun may resume, ``data_prep.pool`` encodes the images in worker processes, ``data_prep.sample`` turns a row
and its images into tar members, ``data_prep.tar`` writes each shard with fixed headers, and
``data_prep.index`` writes ``index.json`` / ``errors.jsonl`` with the audit summary. Only this process
writes tars, in planned order, so the output is the same for any ``--workers``.

A full disk ends the run with one message (how much is free, about how much more is needed) and no
temporary files; the finished shards stay journalled, so the same command finishes the job once there is room.
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from data_prep.index import audit_summary, build_index, write_outputs
from data_prep.journal import Journal, remove_leftovers
from data_prep.options import WriterOptions
from data_prep.plan import fingerprint, plan, planned_tasks
from data_prep.pool import encode_results
from data_prep.sample import build_sample
from data_prep.tar import ShardFile, member_size
from unimlip_train.format.rows import InputError, Row


class OutOfSpace(Exception):
    """The output file system filled up; the message says where, what is free and about what is needed."""


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
        remove_leftovers(out, keep=None)
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
    journal = Journal(out, fingerprint(by_split, options))
    done = journal.load_valid(out, by_split, overwrite)
    remove_leftovers(out, {e["name"] for es in done.values() for e in es if e["name"]})
    (out / "index.json").unlink(missing_ok=True)  # present again only once this run has finished

    tasks, owners = [], []  # owners[i] = (split, row position in split, view index, views of the row)
    for split, items in by_split.items():
        split_tasks, split_owners = planned_tasks(items, options, done[split][-1]["end"] if done[split] else 0)
        tasks += split_tasks
        owners += [(split, *owner) for owner in split_owners]
    made["left"] = sum(1 for o in owners if o[2] == 0)

    current: ShardFile | None = None
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
            members, errors = build_sample(by_split[split][pos], split, source, row_results)
            row_results = []
            made["left"] -= 1
            (current.errors if current is not None else pending).extend(errors)
            if members is None:
                continue
            size = sum(member_size(d) for _, d in members)
            if current is not None and not current.fits(size, options):
                entry = current.close(pos)
                journal.append(entry)
                current.publish()
                done[split].append(entry)
                current = None
            if current is None:
                start = done[split][-1]["end"] if done[split] else 0
                current = ShardFile(out, split, len(done[split]), start)
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

    index = build_index(done, plan_errors, options, source, args_record)
    if options.audit:
        index["audit"] = audit_summary(out, done, progress)
    write_outputs(out, index, plan_errors, done)
    return index
