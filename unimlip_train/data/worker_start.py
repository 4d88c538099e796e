"""How a rank starts its DataLoader workers (``data.worker_start``): from a fork server by default, not by forking
the rank.

Why: a rank has threads (gloo's, tqdm's monitor, multiprocessing's queue feeders, the hang watchdog), and CPython
3.11.7 and earlier can fork a child while another thread holds the interpreter's thread-list lock; the child then hangs
inside ``os.fork()`` and its rank waits for its batches for ever (CPython gh-112275; seen here as CI runs stuck in
2-rank evaluation; ``bench/fork_deadlock.py`` counts such hangs). The fork server is a single-threaded process
that each rank starts once, with the data modules already imported; workers fork from it, safely and in
milliseconds. ``spawn`` (a fresh interpreter per worker: seconds per worker) and ``fork`` (the fastest; safe from
this deadlock on CPython 3.12, and on 3.11 releases with the gh-112275 fix) stay as the alternatives.

The fork server is in the rank's process group, so it starts with the stop signals blocked (the mask survives fork
and exec; pending signals are not inherited): a SIGTERM to the whole group, which the rank turns into a
checkpoint, leaves it and the workers forked from it running. It exits when its rank does (its keep-alive pipe
closes: the workers drop their copies), and each worker dies with it (``worker_signals``).
"""
from __future__ import annotations

import multiprocessing
import os
from multiprocessing import forkserver, resource_tracker

from unimlip_train.data.worker_signals import STOP_SIGNALS, signals_blocked, worker_init

#: Imported once in the fork server, so that a worker starts without importing torch and the decoders again.
_PRELOAD = ["__main__", "unimlip_train.data.loader", "unimlip_train.data.eval_loader"]


def _fork_server() -> int:
    """Start this process's fork server if it is not running (stop signals blocked); its pid."""
    forkserver.set_forkserver_preload(_PRELOAD)  # read only when the server (re)starts
    resource_tracker.ensure_running()  # the server needs it, and starting it unblocks SIGINT and SIGTERM
    with signals_blocked(STOP_SIGNALS):
        forkserver.ensure_running()
    return forkserver._forkserver._forkserver_pid  # noqa: SLF001 (Python keeps the pid only there)


def worker_options(method: str) -> dict:
    """The ``multiprocessing_context`` and ``worker_init_fn`` arguments of a DataLoader made in this rank, whose
    workers start by ``method`` ('forkserver', 'spawn' or 'fork')."""
    parent = _fork_server() if method == "forkserver" else os.getpid()
    return {"multiprocessing_context": multiprocessing.get_context(method), "worker_init_fn": worker_init(parent)}
