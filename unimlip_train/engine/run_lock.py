"""One training job per run directory: ``RUN_DIR/run.lock`` names its holder; a second job refuses at once.

Two jobs writing one run dir interleave metrics, TensorBoard events and checkpoints, so a training takes the
lock before it writes anything. The lock file (JSON) names the holder: host, PID and the PID's start time (a
reused PID is not the holder), since when, the SLURM job / torchrun launch it belongs to, and a heartbeat
that the holder refreshes every ``HEARTBEAT_S``. A lock is stale, and taken over, when

* it belongs to an earlier run of this very launch: SLURM requeued this job (same job id, lower
  ``SLURM_RESTART_COUNT``) or torchrun restarted its workers (same rendezvous, lower restart count);
* its holder ran on this host and that process is gone (``kill -9``, a crash);
* its holder ran on another host and its heartbeat is older than ``STALE_AFTER_S`` (a dead node).

Multi-rank launches: every rank runs ``check_free`` before the process group starts, so a refused launch
never waits in a rendezvous; once the group is up, rank 0 alone takes the lock (``RunLock.acquire``) and
every rank learns the outcome. The check-and-take is serialised by ``flock`` on a guard file where the file
system supports it (local disks, NFSv4; elsewhere it is best effort).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

import unimlip_train.distributed.process_group as du

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0


class RunDirInUse(RuntimeError):
    """Another live job holds the run directory (``unimlip-train`` exits with status 3)."""


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def _slurm_job() -> str:
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _torchrun_launch() -> str:
    """torchrun's rendezvous: no two live launches share one (its address and port are bound while it runs)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return ""
    return f"{env['TORCHELASTIC_RUN_ID']}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _process_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may contain spaces


def _me() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "since": now, "heartbeat": now, "slurm_job": _slurm_job(),
            "slurm_restart": _env_int("SLURM_RESTART_COUNT"), "torchrun": _torchrun_launch(),
            "torchrun_restart": _env_int("TORCHELASTIC_RESTART_COUNT"), "token": uuid.uuid4().hex}


def stale_reason(holder: dict) -> str:
    """Why the lock ``holder`` wrote is stale, seen from this process; '' while its holder may be alive."""
    job = _slurm_job()
    if job and holder.get("slurm_job") == job and holder.get("slurm_restart", 0) < _env_int("SLURM_RESTART_COUNT"):
        return f"it belongs to an earlier run of this SLURM job {job} (requeued)"
    launch = _torchrun_launch()
    if (launch and holder.get("torchrun") == launch
            and holder.get("torchrun_restart", 0) < _env_int("TORCHELASTIC_RESTART_COUNT")):
        return "it belongs to an earlier attempt of this torchrun launch"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        start = _process_start(pid)
        if start is None or (holder.get("pid_start") is not None and start != holder["pid_start"]):
            return f"its process {pid} is gone"
        return ""
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return ""


def _describe(holder: dict, path: str) -> str:
    since = datetime.datetime.fromtimestamp(float(holder.get("since", 0))).isoformat(sep=" ", timespec="seconds")
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    beat = time.time() - float(holder.get("heartbeat", 0))
    return (f"run dir {os.path.dirname(path)} is in use by host {holder.get('host')}, PID {holder.get('pid')}{job}, "
            f"since {since} (last heartbeat {beat:.0f} s ago). Wait for that job, stop it, or use another run dir; "
            f"a lock whose holder died is taken over by itself (on another host after {STALE_AFTER_S:.0f} s "
            f"without heartbeat), or delete {path} once you are sure no job uses it")


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign content: nobody we can check is alive behind it
    return holder if isinstance(holder, dict) else {}


def _write(path: str, record: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def _guard(path: str) -> Iterator[None]:
    """Serialise check-and-take between jobs (flock on ``path.guard``; best effort where unsupported)."""
    with open(path + ".guard", "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the flock


def check_free(run_dir: str) -> None:
    """Raise RunDirInUse when a live job holds ``run_dir``. Needs no process group: every rank calls it first."""
    path = os.path.join(run_dir, LOCK_FILE)
    holder = _read(path)
    if holder and not stale_reason(holder):
        raise RunDirInUse(_describe(holder, path))


class RunLock:
    """The run dir's lock as held by rank 0 of this job (other ranks hold a handle that owns nothing)."""

    def __init__(self, path: str, record: Optional[dict]):
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        if record is not None:
            self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._beat.start()

    @classmethod
    def acquire(cls, run_dir: str) -> "RunLock":
        """Collective: rank 0 takes the lock (a stale one is taken over, with a note), every rank learns whether
        it did; all raise RunDirInUse otherwise. Call after the process group is up, before writing."""
        path = os.path.join(run_dir, LOCK_FILE)
        record, refusal = None, ""
        du.barrier()  # every rank has passed check_free: none can mistake rank 0's fresh lock for a foreign one
        if du.get_rank() == 0:
            os.makedirs(run_dir, exist_ok=True)
            with _guard(path):
                holder = _read(path)
                reason = stale_reason(holder) if holder else ""
                if holder and not reason:
                    refusal = _describe(holder, path)
                else:
                    if holder:
                        print(f"note: taking over the lock of {path} (host {holder.get('host')}, PID "
                              f"{holder.get('pid')}): {reason}", flush=True)
                    record = _me()
                    _write(path, record)
        if du.all_reduce_max(1.0 if refusal else 0.0) > 0:
            raise RunDirInUse(refusal or f"run dir {run_dir} is in use by another job (see rank 0)")
        return cls(path, record)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.beat():
            pass

    def beat(self) -> bool:
        """Refresh the heartbeat; False (and nothing written) when the lock is no longer ours: someone took
        it over because it looked dead to them."""
        with _guard(self.path):
            if (_read(self.path) or {}).get("token") != self.record["token"]:
                return False
            self.record["heartbeat"] = time.time()
            _write(self.path, self.record)
            return True

    def release(self) -> None:
        """Remove the lock if this process still holds it (a no-op on other ranks)."""
        if self.record is None:
            return
        self._stop.set()
        self._beat.join()
        with _guard(self.path):
            if (_read(self.path) or {}).get("token") == self.record["token"]:
                os.remove(self.path)
        self.record = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
