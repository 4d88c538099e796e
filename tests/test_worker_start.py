"""Loader workers are not forked from the (multi-threaded) rank, but from a single-threaded fork server.

Forking a process whose other threads may hold CPython's thread-list lock can leave the child hung inside
``os.fork()`` for ever (CPython gh-112275, up to 3.11.7; ``bench/fork_deadlock.py`` reproduces it with real
2-rank launches). What the default guarantees, checked from inside real workers: their parent is not the rank and
had one thread when it forked them, while the rank has several; the stop signals the rank acts on are blocked in
that parent. The group-SIGTERM behaviour of the workers is ``test_health``'s.
"""
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from conftest import still_running
from unimlip_train.data.worker_signals import STOP_SIGNALS
from unimlip_train.data.worker_start import worker_options


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _blocked(pid: int) -> set:
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    return {signum for signum in STOP_SIGNALS if mask >> (signum - 1) & 1}


class Parentage(IterableDataset):
    """Each worker reports its pid, its parent's pid, the parent's threads and the parent's blocked stop signals."""

    def __iter__(self):
        parent = os.getppid()
        yield torch.tensor([os.getpid(), parent, _threads(parent), len(_blocked(parent))])


@pytest.mark.parametrize("start", ["forkserver", "spawn", "fork"])
def test_where_workers_come_from(start):
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)  # a rank is multi-threaded (gloo, tqdm, feeders)
    busy.start()
    try:
        rows = [r.tolist() for r in DataLoader(Parentage(), batch_size=None, num_workers=2, **worker_options(start))]
        rank_threads = _threads(os.getpid())
    finally:
        stop.set()
    assert len({pid for pid, *_ in rows}) == 2
    parents = {parent for _, parent, *_ in rows}
    if start == "forkserver":
        (server,) = parents
        assert server != os.getpid() and rank_threads > 1
        assert {threads for _, _, threads, _ in rows} == {1}  # forked from a single-threaded process
        assert {blocked for *_, blocked in rows} == {len(STOP_SIGNALS)}  # a group SIGTERM leaves it running
        assert _blocked(os.getpid()) == set()  # the rank's own mask is back as it was
    else:  # spawn: a fresh interpreter started by the rank; fork: a copy of the rank, threads and all
        assert parents == {os.getpid()}
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN


_RANK = """
import sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from unimlip_train.data.worker_start import worker_options

class Endless(IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield torch.zeros(1)

if __name__ == "__main__":
    loader = iter(DataLoader(Endless(), batch_size=None, num_workers=2, **worker_options(sys.argv[1])))
    next(loader)
    print("running", flush=True)
    while True:
        next(loader)
"""


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_kill9_of_a_rank_takes_its_workers_and_fork_server_along(tmp_path, start):
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    rank = subprocess.Popen([sys.executable, str(script), start], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "running"
    helpers = psutil.Process(rank.pid).children(recursive=True)
    assert len([p for p in helpers if p.name() == "pt_data_worker"]) == 2, helpers
    rank.kill()
    rank.wait()
    assert not still_running(helpers)
