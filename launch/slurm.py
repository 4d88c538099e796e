"""Everything that talks to SLURM itself: preflight checks, Submitit executors, and job-state queries.

Kept apart from the CLI so the same executor the user submits with is the one ``--dry-run`` prints, and so
status queries work for jobs submitted by any earlier version of the launcher (they only need job ids).
"""
from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import submitit

# sacct states after which a job will not run again by itself.
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class LaunchError(Exception):
    """A problem the user can fix before anything is submitted (exit status 2)."""


@dataclass
class Resources:
    """What a job asks SLURM for; field names follow sbatch's options."""

    partition: str = ""
    time: str = "01:00:00"
    nodes: int = 1
    max_nodes: int = 0  # above ``nodes``: an elastic job, ``--nodes nodes-max_nodes``
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    comment: Optional[str] = None
    dependency: Optional[str] = None
    signal_seconds: int = 120
    job_name: str = "unimlip"
    extra: dict = field(default_factory=dict)  # further sbatch options, e.g. {"requeue": True}


def parse_time_minutes(text: str) -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) to whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"--time {text!r}: expected HH:MM:SS (or D-HH:MM:SS, or minutes)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
        total_s = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(nums) == 1:  # MM
        total_s = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        total_s = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        total_s = (nums[0] * 60 + nums[1]) * 60 + nums[2]
    if total_s <= 0:
        raise LaunchError(f"--time {text!r}: must be positive")
    return math.ceil(total_s / 60)


def require_sbatch() -> None:
    """Fail early, naming the fix, when this machine cannot submit to SLURM."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found on PATH: run this on a SLURM login node, or use --cluster local "
                          "(or --dry-run to only print the job script)")


def partitions() -> list[str]:
    """Partition names this cluster knows (``sinfo``)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60, check=True)
    except FileNotFoundError:
        raise LaunchError("sinfo not found on PATH: cannot check the partition") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"sinfo failed ({e.returncode}): {e.stderr.strip()}") from None
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def check_partition(name: str) -> None:
    known = partitions()
    if name not in known:
        raise LaunchError(f"unknown partition {name!r} (this cluster has: {', '.join(known) or 'none'})")


def sbatch_parameters(res: Resources) -> dict[str, Any]:
    """``res`` in the names Submitit's SlurmExecutor takes (sbatch's, with ``time`` in minutes).

    The job asks for ``--signal USR2@signal_seconds`` and ``--requeue``, so it can checkpoint before its
    time limit and put itself back in the queue even on clusters where requeueing is off by default, and so
    SLURM requeues it when one of its nodes fails.
    """
    minutes = parse_time_minutes(res.time)
    if res.signal_seconds >= minutes * 60:
        raise LaunchError(f"--signal-seconds {res.signal_seconds} leaves no time to work within --time {res.time}")
    params: dict[str, Any] = {"job_name": res.job_name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
                              "time": minutes, "signal_delay_s": res.signal_seconds,
                              "additional_parameters": {"requeue": True, **res.extra},
                              # one rank failing ends the step, instead of the others waiting in a collective
                              "srun_args": ["--kill-on-bad-exit=1"]}
    cpus_per_task = res.cpus_per_task
    if res.max_nodes > res.nodes:
        # A node range with --ntasks-per-node makes SLURM count the tasks from the minimum and allocate the fewest
        # nodes. Without it SLURM allocates as many nodes of the range as it can (one task each), and srun puts
        # the ranks on every node it got. (Submitit keeps the minimum as its own count of the job's tasks.)
        params["additional_parameters"]["nodes"] = f"{res.nodes}-{res.max_nodes}"
        del params["ntasks_per_node"]
        params["srun_args"] += [f"--ntasks-per-node={res.tasks_per_node}", f"--cpus-per-task={cpus_per_task or 1}"]
        cpus_per_task = res.tasks_per_node * (cpus_per_task or 1)
    optional = {"gpus_per_node": res.gpus_per_node, "cpus_per_task": cpus_per_task, "partition": res.partition,
                "mem": res.mem, "account": res.account, "qos": res.qos, "constraint": res.constraint,
                "comment": res.comment, "dependency": res.dependency, "exclusive": res.exclusive or None}
    params.update({k: v for k, v in optional.items() if v})
    return params


def make_executor(folder: Path, res: Resources, cluster: str) -> submitit.Executor:
    """A Submitit executor for ``cluster``: 'slurm', or 'local' (same job as local processes, for debugging)."""
    if cluster == "local":
        if max(res.nodes, res.max_nodes) != 1:
            raise LaunchError("--cluster local runs on this machine only: use --nodes 1")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=parse_time_minutes(res.time), tasks_per_node=res.tasks_per_node,
                                   gpus_per_node=res.gpus_per_node, nodes=1)
        return executor
    if cluster != "slurm":
        raise LaunchError(f"--cluster {cluster!r}: expected slurm or local")
    params = sbatch_parameters(res)
    require_sbatch()
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor


def sbatch_script(folder: Path, res: Resources, array_size: int = 0) -> str:
    """The sbatch file a submission with ``res`` would use; needs no SLURM on this machine.

    Built with Submitit's own generator (private: it has no public API for this) and the command line its
    SlurmExecutor submits, so what ``--dry-run`` prints is what would run.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    extra = {"map_count": array_size} if array_size else {}
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(res), **extra)


def log_paths(job: submitit.Job) -> tuple[str, str]:
    """stdout / stderr of task 0 (the other tasks write ``..._<task>_log.*`` next to them)."""
    return str(job.paths.stdout), str(job.paths.stderr)


@dataclass
class JobState:
    job_id: str
    state: str
    elapsed: str = ""
    exit_code: str = ""
    requeues: int = 0


def query_states(job_ids: list[str]) -> dict[str, JobState]:
    """Current state of each job (array tasks listed as ``ID_TASK``) from ``sacct``, else ``squeue``.

    ``sacct -D`` lists every run of a requeued job, oldest first: the last is the current state and each
    earlier one (REQUEUED after a preemption, NODE_FAIL after a lost node) counts a requeue. Without
    accounting only queued/running jobs are visible; the others are reported as UNKNOWN.
    """
    found: dict[str, JobState] = {}
    if job_ids and shutil.which("sacct"):
        # -X: the allocation only (not its steps); array tasks are asked for by their own ids.
        cmd = ["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State,Elapsed,ExitCode", "-j", ",".join(job_ids)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                parts = line.split("|")
                if len(parts) < 4:
                    continue
                earlier = found[parts[0]].requeues + 1 if parts[0] in found else 0
                found[parts[0]] = JobState(parts[0], parts[1].split(" ")[0], parts[2], parts[3], earlier)
    missing = [j for j in job_ids if j not in found]
    if missing and shutil.which("squeue"):
        arrays = sorted({j.split("_")[0] for j in missing})
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%M", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0] in missing:
                found[parts[0]] = JobState(parts[0], parts[1], parts[2])
    return {j: found.get(j, JobState(j, "UNKNOWN")) for j in job_ids}
