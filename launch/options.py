"""The SLURM options every submitting command shares (``unimlip-submit``, ``unimlip-ablate --submit``) and what
they become: the option group, the ranks per node, the job's ``Resources``, and the checked executor.

Public for the command-line modules in ``unimlip_train.cli`` (launch never imports them back).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from launch import slurm
from launch.slurm import LaunchError, Resources


def add_slurm_arguments(p: argparse.ArgumentParser, ranks: bool) -> None:
    """The "SLURM resources" option group (``ranks``: also --gpus-per-node / --tasks-per-node)."""
    g = p.add_argument_group("SLURM resources")
    g.add_argument("--partition", default="", help="partition (checked with sinfo; default: the cluster's default)")
    g.add_argument("--time", default="01:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 01:00:00)")
    g.add_argument("--nodes", default="1", metavar="A or A-B",
                   help="nodes (default 1); A-B: an elastic training job that starts on as many as it gets, at least A, "
                        "and when it loses a node is requeued and resumes on what is left (needs "
                        "train.global_batch_size)")
    if ranks:
        per_node = g.add_mutually_exclusive_group()
        per_node.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank (task) per GPU")
        per_node.add_argument("--tasks-per-node", type=int, default=0,
                              help="ranks per node without GPUs (CPU ranks over gloo)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank (data loader workers + 1)")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 256G")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node features, e.g. a100")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--comment", default=None)
    g.add_argument("--dependency", default=None, help="e.g. afterok:12345")
    g.add_argument("--job-name", default=None, help="job name (default: unimlip-<command>)")
    g.add_argument("--signal-seconds", type=int, default=120,
                   help="send USR2 this many seconds before the time limit, to checkpoint and requeue (default 120)")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm (default), or local: the same job as local processes, waited for (debugging)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")


def node_range(text: str) -> tuple[int, int]:
    """``--nodes`` as (at least, at most): ``2`` is (2, 2), ``1-4`` is (1, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise LaunchError(f"--nodes {text!r}: expected a number of nodes (2) or a range (1-2)")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) is not None else low
    if low < 1 or high < low:
        raise LaunchError(f"--nodes {text}: must be >= 1, and a range A-B needs A <= B")
    return low, high


def resources(args: argparse.Namespace, default_name: str, tasks_per_node: int = 1, gpus_per_node: int = 0,
              elastic: bool = False) -> Resources:
    """The job's resources from those options (``default_name``: the job name unless --job-name; ``elastic``:
    the job may take a node range, ``--nodes A-B``)."""
    low, high = node_range(args.nodes)
    if high > low and not elastic:
        raise LaunchError(f"--nodes {args.nodes}: a node range (an elastic job) is for `unimlip-submit train` only; "
                          "give one number")
    return Resources(partition=args.partition, time=args.time, nodes=low, max_nodes=high, tasks_per_node=tasks_per_node,
                     gpus_per_node=gpus_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                     account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
                     comment=args.comment, dependency=args.dependency, signal_seconds=args.signal_seconds,
                     job_name=args.job_name or default_name)


def ranks(args: argparse.Namespace) -> tuple[int, int]:
    """(tasks per node, GPUs per node): one task per GPU, or ``--tasks-per-node`` CPU ranks."""
    if args.gpus_per_node < 0 or args.tasks_per_node < 0:
        raise LaunchError("--gpus-per-node and --tasks-per-node must be >= 0")
    if args.gpus_per_node:
        return args.gpus_per_node, args.gpus_per_node
    return max(1, args.tasks_per_node), 0


def preflight(args: argparse.Namespace, folder: Path, res: Resources):
    """Checks that need the cluster (sbatch on PATH, the partition), then the executor to submit with."""
    executor = slurm.make_executor(folder, res, args.cluster)
    if args.cluster == "slurm" and args.partition:
        slurm.check_partition(args.partition)
    return executor


def after_dashes(rest: list[str]) -> list[str]:
    """The wrapped tool's arguments: everything after our own options (a leading ``--`` dropped)."""
    return rest[1:] if rest[:1] == ["--"] else rest
