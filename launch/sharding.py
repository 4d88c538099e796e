"""``unimlip-shard`` as a SLURM job array whose output is identical to a single-process run.

Why two phases: shard boundaries follow from the encoded image sizes and from which rows turn out to be
unusable, so no array task can know where its shards start before every earlier row is encoded. The costly
part (decode, resize, encode) therefore runs as the array: task ``k`` of ``K`` takes the ``k``-th contiguous
slice of the writer's own planned order and stores its encoded results in ``OUT/.unimlip-array/``. A merge
job (``afterany`` the array) then runs the ordinary ``unimlip-shard`` command with those results in place of
its encoder pool, so shard boundaries, tar bytes, ``index.json`` and ``errors.jsonl`` are the writer's own.

Slice files are tars of JSON and raw bytes (nothing is ever unpickled); each entry carries its task so the
merge refuses results that do not belong to the rows it is writing.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.cli import ADAPTERS, build_parser, run_adapter
from data_prep.options import options_from_args
from data_prep.plan import plan, planned_tasks
from data_prep.pool import encode_results
from launch.slurm import LaunchError

ARRAY_DIR = ".unimlip-array"
HEADER = "slice.json"
# Commands whose input rows can be sliced; `synthetic` generates its images into --out while it runs.
NOT_SLICEABLE = {"synthetic", "verify", "tokenizer"}


def parse_shard_argv(argv: list[str]) -> argparse.Namespace:
    """Parse ``unimlip-shard`` arguments with its own parser, so usage errors appear before submission."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        raise LaunchError(f"invalid unimlip-shard arguments: {' '.join(argv) or '(none)'} "
                          f"(exit {e.code}; see unimlip-shard --help)") from None
    if ns.command in NOT_SLICEABLE:
        raise LaunchError(f"unimlip-shard {ns.command} cannot run as a job array; "
                          "run it directly (or in a one-task job)")
    return ns


def slice_path(out: str | os.PathLike, k: int) -> Path:
    return Path(out) / ARRAY_DIR / f"slice-{k:05d}.tar"


def _planned_tasks(ns: argparse.Namespace) -> list[tuple]:
    """The writer's encode tasks in its order (split by split, rows by key), as a fresh run makes them."""
    adapter = importlib.import_module(ADAPTERS[ns.command])
    options = options_from_args(ns)
    by_split, _ = plan(adapter.iter_rows(ns), options, progress=False)
    return [task for items in by_split.values() for task in planned_tasks(items, options)[0]]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _header(path: Path) -> dict:
    """The fingerprint a slice file starts with ({} when unreadable)."""
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
            if first is None or first.name != HEADER:
                return {}
            return json.loads(tar.extractfile(first).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError):
        return {}


def encode_slice(argv: list[str], k: int, num_slices: int) -> dict:
    """Array task ``k``: encode its slice of the planned rows into ``OUT/.unimlip-array/slice-k.tar``.

    A rerun (requeue, or the same command submitted again after a failure) keeps a finished slice file
    made from the same rows and options: the file only appears, by rename, once complete.
    """
    ns = parse_shard_argv(argv)
    path = slice_path(ns.out, k)
    tasks = _planned_tasks(ns)
    lo, hi = k * len(tasks) // num_slices, (k + 1) * len(tasks) // num_slices
    fingerprint = {"slice": k, "slices": num_slices,
                   "tasks_sha256": hashlib.sha256(json.dumps(tasks[lo:hi]).encode("utf-8")).hexdigest()}
    if path.is_file() and _header(path) == fingerprint:
        return {"slice": k, "rows": hi - lo, "reused": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    workers = min(ns.workers, len(os.sched_getaffinity(0)))
    print(f"slice {k}/{num_slices}: rows {lo}..{hi - 1} of {len(tasks)}, {workers} worker(s)", flush=True)
    errors = 0
    with tarfile.open(tmp, "w") as tar:
        _add(tar, HEADER, json.dumps(fingerprint).encode("utf-8"))
        # The writer's own per-image function and pool, so results are exactly what it would compute.
        for i, (task, result) in enumerate(zip(tasks[lo:hi], encode_results(tasks[lo:hi], workers))):
            entry = {"task": list(task), "status": result[0]}
            if result[0] == "ok":
                entry.update(ext=result[1], info=result[3])
                _add(tar, f"{i:09d}.bin", result[2])
            else:
                entry["reason"] = result[1]
                errors += 1
            _add(tar, f"{i:09d}.json", json.dumps(entry).encode("utf-8"))
    os.replace(tmp, path)
    print(f"slice {k}: {hi - lo} rows encoded, {errors} unusable -> {path}", flush=True)
    return {"slice": k, "rows": hi - lo, "errors": errors, "reused": False}


def _cached(out: str, num_slices: int) -> Iterator[tuple[tuple, tuple]]:
    """(task, writer result) for every encoded row, slice after slice, in planned order."""
    for k in range(num_slices):
        with tarfile.open(slice_path(out, k)) as tar:
            data = b""
            for member in tar:
                if member.name == HEADER:
                    continue
                raw = tar.extractfile(member).read()
                if member.name.endswith(".bin"):
                    data = raw
                    continue
                entry = json.loads(raw)
                task = tuple(entry["task"])
                if entry["status"] == "ok":
                    yield task, ("ok", entry["ext"], data, entry["info"])
                else:
                    yield task, ("error", entry["reason"])


def _results_from_slices(out: str, num_slices: int) -> Callable[[list[tuple], int], Iterator[tuple]]:
    """A stand-in for the writer's encoder pool that replays the slices' results for the tasks it asks."""
    def results(tasks: list[tuple], workers: int) -> Iterator[tuple]:  # noqa: ARG001 (same signature)
        cached = _cached(out, num_slices)
        for task in tasks:  # a resumed writer asks for a suffix of the planned order: skip what it has
            for have, result in cached:
                if have == task:
                    yield result
                    break
            else:
                raise RuntimeError(f"the encoded slices in {Path(out) / ARRAY_DIR} have no result for {task[0]}: "
                                   "the input changed since the array ran; resubmit the whole array")
    return results


def merge_slices(argv: list[str], num_slices: int) -> dict:
    """The merge job: the ordinary ``unimlip-shard`` run, fed by the slices; removes them when done."""
    ns = parse_shard_argv(argv)
    missing = [k for k in range(num_slices) if not slice_path(ns.out, k).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {num_slices} slices missing (array tasks {missing[:20]}): those "
                           "tasks failed or were cancelled, see their logs; resubmitting the same command redoes "
                           "only what is missing")
    ns.workers = 1
    adapter = importlib.import_module(ADAPTERS[ns.command])
    code = run_adapter(ns.command, adapter, ns, encoder=_results_from_slices(ns.out, num_slices))
    if code != 0:
        raise RuntimeError(f"unimlip-shard {ns.command} exited with status {code}")
    shutil.rmtree(Path(ns.out) / ARRAY_DIR)
    with open(Path(ns.out) / "index.json", encoding="utf-8") as f:
        index = json.load(f)
    return {"out": str(ns.out), "samples": index["samples"], "shards": index["shards"], "errors": index["errors"]}
