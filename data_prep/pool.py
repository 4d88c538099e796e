"""The encoding worker pool: decode, resize and encode each planned image in a process pool, in task order.

Why: decoding and encoding are most of the sharding time, so they run in ``--workers`` processes
(the executor's ``map`` keeps input order) while only the parent writes tars, in order; the output therefore does
not
depend on ``--workers``. ``encode_results`` is the writer's default encoder; a SLURM array
(``launch.sharding``) runs the same function on slices and the merge replays their results in its place.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_prep.images import ImageError, process_image


def _worker_signals() -> None:
    """Ctrl-C is the parent's to handle (it shuts the pool down); SIGTERM keeps its default, so a scheduler's
    signal to the whole process group ends a worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_task(task: tuple) -> tuple:
    """Worker job: returns ('ok', ext, bytes, metadata) or ('error', reason); never raises for bad images."""
    try:
        ext, data, info = process_image(*task)
        return ("ok", ext, data, info)
    except ImageError as e:
        return ("error", str(e))
    except Exception as e:  # one odd file must not stop a day-long sharding run
        return ("error", f"unexpected {type(e).__name__}: {e}")


def encode_results(tasks: list[tuple], workers: int) -> Iterator[tuple]:
    """Encoded results in task order, from a process pool or inline for one worker.

    The default ``encoder`` of ``write_shards``; a SLURM array replays results its tasks computed instead.
    A ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: a worker killed mid-result (SIGTERM to the
    process group) can leave a ``Pool``'s shared queue lock taken and its parent's shutdown waiting forever,
    while the executor only reads that queue and shuts down whatever its workers' state.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tqdm, torch)
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_worker_signals)
    try:
        yield from pool.map(_encode_task, tasks, chunksize=4)
    except BrokenProcessPool:
        raise RuntimeError("an image worker process died (killed, or out of memory); the finished shards are "
                           "kept: rerun the same command to finish") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
