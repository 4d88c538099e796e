"""The run-dir lock: a live holder refuses a second job with its host, PID and start time; dead holders (a
gone process here, a silent host, an earlier run of the same SLURM job or torchrun launch) are taken over.
Real processes and real files; the launch-level behaviour (exit status 3) is in test_engine.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import unimlip_train.engine.run_lock as run_lock
from unimlip_train.engine.run_lock import LOCK_FILE, RunDirInUse, RunLock, check_free

CLEAN_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
             "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for k in CLEAN_ENV:
        monkeypatch.delenv(k, raising=False)


def _holder(tmp_path, **fields) -> dict:
    """A lock record as another job would have written it (by default: this host, a live process)."""
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": run_lock._process_start(os.getppid()),
              "since": now - 60, "heartbeat": now, "slurm_job": "", "slurm_restart": 0, "torchrun": "",
              "torchrun_restart": 0, "token": "theirs", **fields}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    return record


def test_a_live_holder_refuses_another_process_naming_host_pid_and_since(tmp_path):
    with RunLock.acquire(str(tmp_path)) as lock:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
        probe = "from unimlip_train.engine.run_lock import check_free; import sys; check_free(sys.argv[1])"
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(held["since"]))
        for part in ("RunDirInUse", "in use", f"host {socket.gethostname()}", f"PID {os.getpid()}", since):
            assert part in out.stderr, (part, out.stderr[-500:])
        assert lock.beat()  # the holder refreshes its heartbeat
        assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] >= held["heartbeat"]
    assert not (tmp_path / LOCK_FILE).exists()  # released
    check_free(str(tmp_path))


def test_a_gone_process_on_this_host_is_stale_and_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _holder(tmp_path, pid=gone.pid, pid_start=None)
    check_free(str(tmp_path))
    with RunLock.acquire(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"process {gone.pid} is gone" in capsys.readouterr().out
    _holder(tmp_path, pid=os.getpid(), pid_start=run_lock._process_start(os.getpid()) + 1)  # a reused PID
    assert "is gone" in run_lock.stale_reason(json.loads((tmp_path / LOCK_FILE).read_text()))


def test_a_live_holder_is_not_taken_over_and_keeps_its_lock(tmp_path):
    record = _holder(tmp_path)
    with pytest.raises(RunDirInUse, match=f"PID {record['pid']}"):
        RunLock.acquire(str(tmp_path))
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"


def test_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    _holder(tmp_path, host="gpu042", heartbeat=time.time() - 10)
    with pytest.raises(RunDirInUse, match="host gpu042"):
        check_free(str(tmp_path))
    _holder(tmp_path, host="gpu042", heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
    check_free(str(tmp_path))


def test_a_requeued_slurm_job_or_restarted_torchrun_takes_its_own_lock_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _holder(tmp_path, host="gpu042", slurm_job="4242", slurm_restart=0)  # fresh heartbeat, another node
    check_free(str(tmp_path))
    _holder(tmp_path, host="gpu042", slurm_job="4242", slurm_restart=1)  # this very run on another node?
    with pytest.raises(RunDirInUse):
        check_free(str(tmp_path))
    _holder(tmp_path, host="gpu042", slurm_job="999", slurm_restart=0)  # another job
    with pytest.raises(RunDirInUse, match="SLURM job 999"):
        check_free(str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    _holder(tmp_path, host="gpu042", torchrun="abc@node1:29500", torchrun_restart=1)
    check_free(str(tmp_path))
    _holder(tmp_path, host="gpu042", torchrun="other@node1:29501", torchrun_restart=1)
    with pytest.raises(RunDirInUse):
        check_free(str(tmp_path))


def test_a_taken_over_lock_is_not_written_back_by_the_old_holder(tmp_path):
    lock = RunLock.acquire(str(tmp_path))
    _holder(tmp_path, token="newer")  # someone judged us dead and took over
    assert not lock.beat()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "newer"
