"""Hung 2-rank launches for each way of starting loader workers (``data.worker_start``), and what each costs.

Each launch is 2 gloo ranks under torchrun; each rank keeps a tqdm bar and runs a collective per round, and starts
a 2-worker DataLoader ``--rounds`` times in a row, rank 1 abandoning every other loader after one batch (as
evaluation does when a rank fails). That is where CPython up to 3.11.7 can fork a worker while another thread holds
the interpreter's thread-list lock (gh-112275): the worker hangs inside ``os.fork()`` and its rank waits on it for
ever. A launch still running after ``--timeout`` seconds counts as hung; it is killed with every process it
started. Then, in this process, the seconds from ``iter(DataLoader)`` to the first batch, first loader (with the
fork server's start) and later loaders, as a ratio to ``fork``.

Usage: python bench/fork_deadlock.py [--launches 8] [--rounds 300] [--timeout 150] [--methods fork,forkserver]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

from unimlip_train.data.worker_start import worker_options


class Few(IterableDataset):
    def __iter__(self):
        yield from (torch.zeros(4) for _ in range(6))


def rank_main(method: str, rounds: int) -> None:
    """One rank of a launch (run by torchrun)."""
    import torch.distributed as dist
    from tqdm import tqdm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.devnull, "w") as sink:
        for k in range(rounds):
            bar = tqdm(total=6, file=sink)
            for i, _ in enumerate(DataLoader(Few(), batch_size=None, num_workers=2, **worker_options(method))):
                if rank == 1 and k % 2 == 0 and i == 1:
                    break
                bar.update(1)
            bar.close()
            dist.all_reduce(torch.ones(8))
    dist.destroy_process_group()


def launch(method: str, rounds: int, timeout: float) -> str:
    """'ok', 'hung' or 'failed (rc N)' for one 2-rank launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--rank-of", method, "--rounds", str(rounds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _, err = proc.communicate(timeout=timeout)
        return "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode}): {err[-300:]}"
    except subprocess.TimeoutExpired:
        everything = psutil.Process(proc.pid).children(recursive=True)  # ranks live in sessions of their own
        for p in [*everything, psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.communicate()
        return "hung"


def start_seconds(method: str, loaders: int = 5) -> list[float]:
    """Seconds from ``iter(DataLoader)`` to the first batch, for ``loaders`` loaders in a row."""
    out = []
    for _ in range(loaders):
        t0 = time.perf_counter()
        next(iter(DataLoader(Few(), batch_size=None, num_workers=2, **worker_options(method))))
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=8, help="2-rank launches per method")
    ap.add_argument("--rounds", type=int, default=300, help="loaders started per rank and launch")
    ap.add_argument("--timeout", type=float, default=150, help="seconds after which a launch counts as hung")
    ap.add_argument("--methods", default="fork,forkserver", help="comma-separated data.worker_start values")
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)
    ap.add_argument("--time-start", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.rounds)
        return
    if args.time_start:
        print(*start_seconds(args.time_start))
        return
    methods = args.methods.split(",")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {args.launches} launches x "
          f"{args.rounds} loaders per rank", flush=True)
    for method in methods:
        results = []
        for i in range(args.launches):
            results.append(launch(method, args.rounds, args.timeout))
            print(f"  {method} launch {i}: {results[-1]}", flush=True)
        print(f"{method}: {results.count('hung')}/{len(results)} launches hung", flush=True)
    base = None
    for method in methods:  # each method's fork server (if any) starts fresh in a process of its own
        first, *later = map(float, subprocess.check_output([sys.executable, __file__, "--time-start", method],
                                                          text=True).split())
        later_mean = sum(later) / len(later)
        base = base or (first, later_mean)
        print(f"{method}: first loader {first:.2f} s ({first / base[0]:.1f}x {methods[0]}), later loaders "
              f"{later_mean:.3f} s ({later_mean / base[1]:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
