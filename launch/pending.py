"""Why a job waits: SLURM's pending reason (``squeue %r``) verbatim, with a plain explanation.

The commonest wait after a node failure is a job that needs more nodes than its partition has up: SLURM then
says ``Resources`` or ``ReqNodeNotAvail``, and only a look at the partition's nodes tells the user that the job
cannot start until a node comes back. That case is worked out here from ``sinfo`` (e.g. "waiting for 2 nodes:
1 of 2 is down (xn2)"); the other reasons get a sentence each.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

# Node states (sinfo %T, lower case) in which a node takes no job; a trailing "*" (not responding) counts too.
UNAVAILABLE = ("down", "drain", "fail", "maint", "inval", "unknown", "future", "power", "reboot", "reserved")

REASONS = {
    "BeginTime": "not before its start time {start} (a requeued job waits a moment before it may start again)",
    "Priority": "other jobs come first (priority)",
    "Resources": "waiting for free nodes (busy with other jobs)",
    "Dependency": "waiting for the jobs it depends on",
    "DependencyNeverSatisfied": "will never start: a job it depends on did not end as required; cancel it",
    "JobHeldUser": "held by its user: scontrol release {job} lets it go",
    "JobHeldAdmin": "held by an administrator",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionNodeLimit": "asks for more nodes than its partition allows or has",
    "PartitionTimeLimit": "its --time is above the partition's limit",
    "ReqNodeNotAvail": "a node it needs is not available (down, drained or reserved)",
    "NodeDown": "a node it needs is down",
    "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions":
        "a node it needs is down, drained or reserved",
    "launch failed requeued held": "its launch failed and SLURM held it: scontrol release {job} retries",
    "None": "about to be scheduled",
}


@dataclass
class Pending:
    job_id: str
    reason: str  # SLURM's, verbatim
    nodes: int  # the least it can run on
    partition: str
    start: str

    def explain(self, partition_nodes: dict[str, str]) -> str:
        """The plain sentence; ``partition_nodes``: node -> state of the job's partition."""
        down = {n: s for n, s in partition_nodes.items() if unavailable(s)}
        up = len(partition_nodes) - len(down)
        if partition_nodes and self.nodes > up:
            kinds = {_word(s) for s in down.values()}
            if len(kinds) == 1:
                word, names = kinds.pop(), ", ".join(sorted(down))
            else:
                word, names = "unavailable", ", ".join(f"{n} {_word(s)}" for n, s in sorted(down.items()))
            verb = "is" if len(down) == 1 else "are"
            plain = (f"waiting for {self.nodes} node{'s' if self.nodes != 1 else ''}: {len(down)} of "
                     f"{len(partition_nodes)} {verb} {word} ({names}); it starts when enough are back")
        else:
            key = next((k for k in REASONS if self.reason == k or self.reason.startswith(k + ",")), "")
            plain = REASONS.get(key, "").format(start=self.start, job=self.job_id) or "see squeue -j " + self.job_id
        return f"{plain} (SLURM reason: {self.reason})"


def unavailable(state: str) -> bool:
    return state.endswith("*") or state.lower().startswith(UNAVAILABLE)


def _word(state: str) -> str:
    """"down*" -> "down", "drained" -> "drained", "idle*" -> "not responding"."""
    base = state.rstrip("*~#!%$@^-").lower()
    return base if base.startswith(UNAVAILABLE) else "not responding"


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else ""


def pending_jobs(job_ids: list[str]) -> dict[str, Pending]:
    """The pending ones among ``job_ids`` (squeue), by id."""
    if not job_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r|%D|%P|%S", "-j", ",".join(job_ids)])
    found = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 5 and parts[0] in job_ids:
            m = re.match(r"\d+", parts[2])
            found[parts[0]] = Pending(parts[0], parts[1], int(m.group()) if m else 1, parts[3], parts[4])
    return found


def partition_nodes(partition: str) -> dict[str, str]:
    """node -> state (sinfo %T) of every node of ``partition``."""
    out = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%T"])
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def why_pending(job_ids: list[str]) -> dict[str, str]:
    """For each pending job among ``job_ids``: why it waits, in one line."""
    jobs = pending_jobs(job_ids)
    nodes = {p: partition_nodes(p) for p in {j.partition for j in jobs.values()}}
    return {j: p.explain(nodes[p.partition]) for j, p in jobs.items()}
