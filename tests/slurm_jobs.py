"""What the SLURM tests share: the local cluster (``launch/local_cluster.sh``), ``unimlip-submit`` as a user runs
it, and job states read with ``sacct`` directly (independent of the launcher's own status code)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
CLUSTER_SCRIPT = REPO / "launch" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def cluster_up(nodes: int = 1) -> str:
    """Bring the local SLURM up with ``nodes`` nodes (idempotent; another count reconfigures); returns the
    partition. Skips only where it cannot start, never in CI (``UNIMLIP_REQUIRE_SLURM=1``)."""
    reason = ""
    if os.geteuid() != 0:
        reason = "launch/local_cluster.sh needs root"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        reason = "no SLURM installed and no apt-get to install it"
    else:
        done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", "--nodes", str(nodes)], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            reason = f"local_cluster.sh up --nodes {nodes} failed: {done.stderr.strip()[-2000:]}"
    if reason:
        if os.environ.get("UNIMLIP_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True).stdout.split()[0]


def submit(*args: str, expect: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "unimlip_train.cli.submit", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert done.returncode == expect, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def job_id_of(stdout: str, key: str = "job_id") -> str:
    ids = re.findall(rf"^{key}: (\S+)$", stdout, flags=re.M)
    assert len(ids) == 1, stdout
    return ids[0]


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                         capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|")[:2] for line in out.splitlines() if "|" in line)
    return states.get(job_id, "UNKNOWN").split(" ")[0]


def job_state(job_id: str) -> str:
    """The job's state: squeue's while SLURM still holds it (a job requeued after a node failure shows NODE_FAIL
    in sacct for a moment, then PENDING), sacct's once it has left the queue."""
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.split()
    return queued[0] if queued else sacct_state(job_id)


def wait_done(job_id: str, timeout: float = 420) -> str:
    """Poll until the job reaches a terminal state (a requeued job passes through PENDING again)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout} s")


def wait_for(what: str, predicate, job_id: str, timeout: float = 300) -> None:
    """Poll ``predicate`` until true; fail when the job ended first or after ``timeout`` s."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline and job_state(job_id) not in TERMINAL, f"job {job_id} never got to {what}"
        time.sleep(0.3)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


def steps_logged(run_dir: Path) -> int:
    """Train lines metrics.jsonl holds so far (complete lines only: the job may be writing one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    text = path.read_text()
    return sum('"split": "train"' in line for line in text[: text.rfind("\n") + 1].splitlines())


def shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def synthetic_shards_in(out: Path) -> Path:
    """96 synthetic pairs at 64 px sharded into ``out`` (the SLURM tests' training data)."""
    done = shard_cli("synthetic", "--n", "96", "--image-size", "64", "--out", str(out), "--workers", "1",
                     "--no-progress")
    assert done.returncode == 0, done.stderr
    return out
