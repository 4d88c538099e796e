"""The encoding worker pool: decode, resize and encode each planned image in a process pool, in task order.

Why: decoding and encoding are most of the sharding time, so they run in ``--workers`` processes
(the executor's ``map`` keeps input order) while only the parent writes tars, in order; the output therefore does
not
depend on ``--workers``. ``encode_results`` is the writer's default encoder; a SLURM array
(``launch.sharding``) runs the same function on slices and the merge replays their results in its place.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_prep.images import ImageError, process_image
from unimlip_train.data.worker_signals import die_with_parent, signals_blocked

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _worker_signals(parent: int) -> None:
    """Ctrl-C and a scheduler's SIGTERM to the whole process group are the parent's to handle: it stops taking
    results and shuts the pool down, and each worker finishes the image in hand. A worker killed while sending
    its result, or while starting (a half-started worker breaks the pool), left the executor waiting forever
    (seen as a hung `unimlip-shard` after SIGTERM). So workers are born with these signals blocked (the mask
    survives fork and exec) and ignore them from here on; a worker still dies with its parent if that is killed."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    die_with_parent(parent)


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
    A ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: the executor notices a worker that died (out
    of memory, killed on its own) and raises ``BrokenProcessPool``, where a ``Pool`` waits forever.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tqdm, torch)
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_worker_signals,
                               initargs=(os.getpid(),))
    try:
        # The workers start now (the executor submits every chunk at once): with the stop signals blocked, so
        # that one arriving meanwhile waits for the parent, which handles it after the mask is restored.
        with signals_blocked(_STOP_SIGNALS):
            results = pool.map(_encode_task, tasks, chunksize=4)
        yield from results
    except BrokenProcessPool:
        raise RuntimeError("an image worker process died (killed, or out of memory); the finished shards are "
                           "kept: rerun the same command to finish") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
