"""``RUN_DIR/world.json``: the shape of this launch of a run, written by rank 0 when the launch starts.

A run that lost a node, or came back from the queue on other nodes, says so here: how many ranks, the hostname
of every rank in rank order, how many launches the run dir has seen (this one included), the SLURM job and its
restart count. The earlier launches stay in ``history`` (oldest first), so a run's moves can be read back after
the fact, e.g. 2 ranks on ``xn1, xn2``, then 1 rank on ``xn2`` after ``xn1`` died.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import unimlip_train.distributed.process_group as du
from unimlip_train.engine.checkpoint.save import atomic_write

WORLD_FILE = "world.json"


def _slurm_fields() -> dict:
    env = os.environ
    job: Optional[str] = env.get("SLURM_JOB_ID")
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    restarts = env.get("SLURM_RESTART_COUNT", "0") if job else None
    return {"slurm_job_id": job, "slurm_restart_count": int(restarts or 0) if job else None,
            "slurm_nodelist": env.get("SLURM_JOB_NODELIST") if job else None}


def read_world(run_dir: str) -> Optional[dict]:
    """The last launch's record, None when the run dir has none (or an unreadable one)."""
    try:
        with open(os.path.join(run_dir, WORLD_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_launch(run_dir: str) -> dict:
    """Collective: every rank's hostname to rank 0, which writes ``world.json`` (atomically) and returns the
    record; the other ranks return theirs without ``launch`` and ``history``."""
    hosts = du.all_gather_object(socket.gethostname())
    record = {"world_size": len(hosts), "hosts": hosts, **_slurm_fields(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if du.get_rank() != 0:
        return record
    previous = read_world(run_dir)
    history = []
    if previous is not None:
        history = list(previous.pop("history", []) or []) + [previous]
    record = {"launch": len(history) + 1, **record, "history": history}
    atomic_write(os.path.join(run_dir, WORLD_FILE), json.dumps(record, indent=1))
    return record


def describe_launch(record: dict, run_dir: str) -> str:
    """One line for the job log, e.g. ``launch 2 of runs/x: 1 rank(s) on xn2 (SLURM job 7, restart 1)``."""
    job = (f" (SLURM job {record['slurm_job_id']}, restart {record['slurm_restart_count']})"
           if record.get("slurm_job_id") else "")
    nodes = ", ".join(dict.fromkeys(record["hosts"]))  # hosts in rank order, each once
    return f"launch {record.get('launch', '?')} of {run_dir}: {record['world_size']} rank(s) on {nodes}{job}"
