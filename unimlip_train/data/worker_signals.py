"""DataLoader workers leave the stop signals to their rank: the rank checkpoints, then stops its workers.

A SIGTERM or SIGINT sent to a whole process group (torchrun forwarding its own SIGTERM with ``killpg``, SLURM
signalling every process of a step at the time limit or on ``scancel``, Ctrl-C in a terminal) reaches the
workers too. PyTorch's worker SIGTERM handler then kills the worker, and the rank, which was about to
checkpoint at the next step boundary, dies instead with "DataLoader worker (pid ...) is killed by signal:
Terminated". So each worker ignores SIGTERM, SIGINT and SIGUSR2 (``worker_init``); the rank shuts its
workers down in good order when its iterator closes (a done event, then a join), and

* a worker dies with its rank whatever way the rank ends: ``PR_SET_PDEATHSIG`` = SIGKILL against the process that
  started it (the rank, or the rank's fork server: ``worker_start``), safe because that process started it from
  its main thread, which lives as long as the process. A fork server exits once no process holds its keep-alive
  pipe; Python hands a copy to every process it starts, and a worker that kept it outlived a killed rank for
  ever (the server waited for the worker, the worker for the server), so each worker closes it;
* a worker prints every thread's Python stack to its stderr (the rank's) on ``STACK_SIGNAL`` (SIGUSR1), which the
  hang watchdog sends it, so a hang inside the loader shows where;
* a worker still alive when the rank exits after an error (its iterator kept alive by a traceback) is
  SIGKILLed by an atexit hook that runs before multiprocessing's own, which would send it the SIGTERM it now
  ignores and then wait for it forever.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import functools
import multiprocessing
import os
import signal
import sys
from multiprocessing import forkserver

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
#: Sent by the hang watchdog to a rank's loader workers: each prints its threads' stacks to stderr.
STACK_SIGNAL = signal.SIGUSR1
_hooked = False


@contextlib.contextmanager
def signals_blocked(signals):
    """Block ``signals`` in this thread meanwhile: a process started meanwhile inherits the mask (it survives fork
    and exec), and a signal arriving meanwhile is not lost, it waits (or another thread takes it)."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def die_with_parent(parent: int) -> None:
    """In a child process: be SIGKILLed when ``parent`` (the process that started it, from its main thread) dies;
    exit at once if it is already gone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl took effect: this process was adopted
        os._exit(1)


def _release_fork_server() -> None:
    """In a worker: close its copy of the fork server's keep-alive pipe, if it has one."""
    server = forkserver._forkserver  # noqa: SLF001 (the pipe is known only there)
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def _init(parent: int, worker_id: int) -> None:  # noqa: ARG001 (the DataLoader's worker_init_fn signature)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    faulthandler.register(STACK_SIGNAL, all_threads=True)
    _release_fork_server()
    die_with_parent(parent)


def _kill_leftover_workers() -> None:
    children = [child for child in multiprocessing.active_children() if child.daemon]  # DataLoader workers
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report the kill as an error
    for child in children:
        child.kill()
        child.join(timeout=5)


def worker_init(parent: int):
    """The ``worker_init_fn`` for this process's DataLoaders (call it in the rank, where the loader is made), whose
    workers are started by ``parent`` (the rank itself, or its fork server)."""
    global _hooked
    if not _hooked:
        atexit.register(_kill_leftover_workers)  # registered after multiprocessing's hook, so it runs first
        _hooked = True
    return functools.partial(_init, parent)
