"""Training health: ranks follow their launcher, SIGTERM checkpoints under torchrun, the hang watchdog, the
loss-spike rollback, the stragglers' times.

Unit checks first (one process each, real processes and signals, no DeepSpeed): the spike detector against a naive
recomputation, the launcher watch on real process chains, the watchdog's exactly-once summary with two real gloo
ranks (also when rank 0 is wedged beyond Python), DataLoader workers under a process-group SIGTERM.

Then the launches of the issue, on 2 gloo ranks over real shards: one run dir goes through ``kill -9`` of torchrun
(launch A), SIGTERM to torchrun with one rank's loader slowed (B: checkpoint, no traceback, the straggler named),
and a rerun that resumes there with ``UNIMLIP_FAULT_SPIKE=12`` (C: rolled back, finishes with exit 0); a hang
(``UNIMLIP_FAULT_HANG=1:6``, under DeepSpeed's launcher, which returns the ranks' status) ends with status 4.
About 3-4 minutes on the 2-core CPU machine, most of it the four launches.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import still_running, tiny_overrides, tiny_shards
from unimlip_train.engine.health.faults import Faults
from unimlip_train.engine.health.spike import MIN_HISTORY, SpikeDetector

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
MB = 8
TIMEOUT = 400


# ----------------------------------------------------------------------------------------------------
# The spike detector against a naive recomputation
# ----------------------------------------------------------------------------------------------------


def naive_spikes(losses: list, factor: float, window: int, patience: int) -> list:
    """(first step, last step, median) of each spike that asks for a rollback, recomputed from scratch at every
    step: the median of the last ``window`` normal losses before it, judged once min(window, 10) are known."""
    normal, streak, out = [], [], []
    for step, loss in enumerate(losses, start=1):
        if not math.isfinite(loss):
            continue
        recent = normal[-window:]
        median = statistics.median(recent) if len(recent) >= min(window, 10) else None
        if median is not None and median > 0 and loss > factor * median:
            streak.append(step)
            if len(streak) == patience:
                out.append((streak[0], step, median))
                streak = []
            continue
        streak = []
        normal.append(loss)
    return out


def _sequence(rng: random.Random, n: int) -> list:
    losses, level = [], 20.0
    for _ in range(n):
        level *= rng.uniform(0.97, 1.01)
        r = rng.random()
        if r < 0.06:
            losses.extend([level * rng.uniform(8, 40)] * rng.randint(1, 5))  # blips and spikes of any length
        elif r < 0.08:
            losses.append(rng.choice([math.nan, math.inf]))
        else:
            losses.append(level * rng.uniform(0.8, 1.2))
    return losses


def _detect(losses: list, factor: float, window: int, patience: int, resume_at: int = 0) -> list:
    history: list = []
    detector, got = SpikeDetector(factor, window, patience, history), []
    for step, loss in enumerate(losses, start=1):
        if resume_at and step >= resume_at and not detector.spike_pending:
            # a resume: a new detector from the window as the checkpoint's trainer state holds it
            detector, resume_at = SpikeDetector(factor, window, patience, json.loads(json.dumps(history))), 0
            history = detector.history
        if spike := detector.update(step, loss):
            got.append((spike.first_step, spike.last_step, spike.median))
        assert len(history) <= window
    return got


@pytest.mark.parametrize("seed", range(6))
def test_spike_detector_matches_a_naive_recomputation_and_resumes_exactly(seed):
    rng = random.Random(seed)
    factor, window, patience = rng.choice([3.0, 10.0]), rng.choice([5, 12, 50]), rng.choice([1, 2, 3])
    losses = _sequence(rng, 400)
    want = naive_spikes(losses, factor, window, patience)
    assert want, "the sequence should hold spikes"
    assert _detect(losses, factor, window, patience) == want
    assert _detect(losses, factor, window, patience, resume_at=rng.randint(50, 350)) == want
    assert MIN_HISTORY == 10  # what naive_spikes assumes


def test_fault_variables_are_parsed_with_clear_errors():
    env = {"UNIMLIP_FAULT_HANG": "1:6", "UNIMLIP_FAULT_SPIKE": "12", "UNIMLIP_FAULT_SLOW_DATA": "0:0.25"}
    assert Faults.from_env(1, env) == Faults(1, hang_step=6, spike_step=12, slow_data_s=0.0)
    assert Faults.from_env(0, env) == Faults(0, hang_step=None, spike_step=12, slow_data_s=0.25)
    with pytest.raises(ValueError, match=r"UNIMLIP_FAULT_HANG='6': expected RANK:STEP"):
        Faults.from_env(0, {"UNIMLIP_FAULT_HANG": "6"})
    with pytest.raises(ValueError, match=r"UNIMLIP_FAULT_SPIKE='x': expected STEP"):
        Faults.from_env(0, {"UNIMLIP_FAULT_SPIKE": "x"})


# ----------------------------------------------------------------------------------------------------
# Ranks follow their launcher: real process chains, kill -9
# ----------------------------------------------------------------------------------------------------

_CHILD = """
import sys, time
from unimlip_train.engine.health.parent import LauncherWatch
print("watching" if LauncherWatch.start_if_launched(rank=0) else "not watching", flush=True)
time.sleep(120)
"""
_SPAWN = """
import subprocess, sys
child = subprocess.Popen(sys.argv[1:])
print("spawned", child.pid, flush=True)
print("reaped", child.wait(), flush=True)
"""
# Made a subreaper, the harness becomes the parent of every orphan below it and collects their exit statuses.
_HARNESS = """
import ctypes, json, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
cmd, levels, kill_level, wait_s = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
read, write = os.pipe()
top = subprocess.Popen(cmd, stdout=write, stderr=subprocess.STDOUT)
os.close(write)
out, lines = os.fdopen(read), []
while sum(x.startswith("spawned") for x in lines) < levels or not any(x.endswith("watching") for x in lines):
    line = out.readline()
    if not line:
        sys.exit("the chain ended early: " + repr(lines))
    lines.append(line.strip())
pids = [top.pid] + [int(x.split()[1]) for x in lines if x.startswith("spawned")]
os.kill(pids[kill_level], signal.SIGKILL)
def running(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False
t0, statuses = time.time(), {}
while running(pids[-1]) and time.time() - t0 < wait_s:
    time.sleep(0.05)
seconds, stopped = time.time() - t0, not running(pids[-1])
# A launcher left alive reaps the child and prints its status on its own: killing it now could land between
# its wait() and its print and lose both (CI saw that once under load).
deadline = time.time() + 10
while stopped and any(running(pid) for pid in pids) and time.time() < deadline:
    time.sleep(0.05)
for pid in pids:
    if running(pid):
        os.kill(pid, signal.SIGKILL)
lines += [x.strip() for x in out.readlines()]
while True:
    try:
        pid, code = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    statuses[pid] = os.waitstatus_to_exitcode(code)
reaped = [int(x.split()[1]) for x in lines if x.startswith("reaped")]
status = statuses.get(pids[-1], reaped[0] if reaped else None) if stopped else None
print(json.dumps({"status": status, "seconds": seconds, "lines": lines}))
"""


def _chain(levels: list, kill_level: int, env: dict, wait_s: float = 15.0) -> dict:
    """Start ``levels`` nested spawner processes (each one's command line carrying its marker word), the watching
    child under the last; SIGKILL the process at ``kill_level`` (0: the outermost); the child's exit status (None:
    still running after ``wait_s``), how long it took to end, and every line printed."""
    cmd = [sys.executable, "-c", _CHILD]
    for marker in reversed(levels):
        cmd = [sys.executable, "-c", _SPAWN + f"# {marker}\n", *cmd]
    out = subprocess.run([sys.executable, "-c", _HARNESS, json.dumps(cmd), str(len(levels)), str(kill_level),
                          str(wait_s)],
                         capture_output=True, text=True, timeout=90, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_a_rank_exits_within_seconds_when_its_launcher_is_killed():
    got = _chain(["launcher"], 0, {"UNIMLIP_FOLLOW_LAUNCHER": "1"})
    assert got["status"] == 129 and got["seconds"] < 10, got
    assert "watching" in got["lines"]
    message = [x for x in got["lines"] if "its launcher" in x]
    assert len(message) == 1 and "is gone; exiting now (status 129) without a checkpoint" in message[0], got


def test_a_process_started_from_a_shell_outlives_it():
    """No launcher in sight (a bare unimlip-train under nohup): the parent's death changes nothing."""
    got = _chain(["shell"], 0, {"UNIMLIP_FOLLOW_LAUNCHER": ""}, wait_s=4.0)  # the watch polls every second
    assert got["status"] is None and "not watching" in got["lines"], got


def test_under_deepspeeds_launcher_a_rank_follows_the_deepspeed_command_too():
    """DeepSpeed's per-node launcher outlives the `deepspeed` command that started it: the rank watches both."""
    got = _chain(["deepspeed", "deepspeed.launcher.launch"], 0, {"UNIMLIP_FOLLOW_LAUNCHER": ""})
    assert "watching" in got["lines"], got
    reaped = [x for x in got["lines"] if x.startswith("reaped")]  # the per-node launcher, still alive, reaps it
    assert reaped == ["reaped 129"] and got["seconds"] < 15, got
    assert any("its launcher (the deepspeed command, PID" in x for x in got["lines"]), got


# ----------------------------------------------------------------------------------------------------
# The watchdog's ending: two real gloo ranks (no DeepSpeed), one summary line whoever is stuck
# ----------------------------------------------------------------------------------------------------

_WATCHED_RANK = """
import ctypes, sys, time
import torch.distributed as dist
from unimlip_train.engine.health.watchdog import HangWatchdog
rank, run_dir, store, wedged = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
watchdog = HangWatchdog(run_dir, rank, 2, timeout_s=2.0, grace_s=3.0, on_hang=lambda: f"on_hang ran on rank {rank}")
watchdog.start(0)
watchdog.beat(1)
watchdog.crumb("the test's collective")
if wedged and rank == 0:
    ctypes.PyDLL(None).sleep(120)  # a C call that keeps the GIL: no thread of this process runs Python now
time.sleep(120)
"""


def _watched_ranks(tmp_path: Path, wedged: bool) -> tuple[list, list]:
    script = tmp_path / "watched_rank.py"  # a file, so that the dumped stacks show its source lines
    script.write_text(_WATCHED_RANK)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path), str(tmp_path / "store"),
                               "1" if wedged else "0"], stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    codes = {}
    for rank in (1, 0):  # a wedged rank 0 is killed only once rank 1 has ended
        try:
            codes[rank] = procs[rank].wait(timeout=1 if wedged and rank == 0 else 60)
        except subprocess.TimeoutExpired:
            procs[rank].kill()
            procs[rank].wait()
            codes[rank] = None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [codes[0], codes[1]], [json.loads(line) for line in lines]


def test_a_hang_ends_both_ranks_with_status_4_two_dumps_and_one_summary_line(tmp_path):
    codes, lines = _watched_ranks(tmp_path, wedged=False)
    assert codes == [4, 4]
    (summary,) = lines
    assert summary["split"] == "summary" and summary["status"] == "hung" and summary["ranks_dumped"] == [0, 1]
    assert summary["action"] == "on_hang ran on rank 0" and summary["step"] == 1
    assert summary["last_collective"]["1"].startswith("the test's collective (step 2, entered")
    for rank in (0, 1):
        dump = (tmp_path / "hang" / f"rank{rank}.txt").read_text()
        assert f"rank {rank} of 2" in dump and "last collective entered: the test's collective" in dump
        assert "Thread MainThread" in dump and "time.sleep(120)" in dump


def test_a_rank_0_wedged_beyond_python_leaves_the_summary_line_to_another_rank(tmp_path):
    codes, lines = _watched_ranks(tmp_path, wedged=True)
    assert codes[1] == 4 and codes[0] is None  # rank 0 never ran Python again (its launcher would kill it)
    (summary,) = lines
    assert summary["status"] == "hung" and summary["ranks_dumped"] == [1]
    assert summary["action"] == "on_hang ran on rank 1"
    assert not (tmp_path / "hang" / "rank0.txt").exists()



# ----------------------------------------------------------------------------------------------------
# DataLoader workers under a SIGTERM to the whole process group
# ----------------------------------------------------------------------------------------------------

_LOADER = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from unimlip_train.data.worker_start import worker_options

class Slow(IterableDataset):
    def __iter__(self):
        for i in range(10_000):
            time.sleep(0.02)
            yield torch.tensor([i, os.getpid()])

if __name__ == "__main__":  # a script: workers started by a fork server or spawn import it
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(time.time()))
    loader = iter(DataLoader(Slow(), batch_size=None, num_workers=2, **worker_options(sys.argv[1])))
    workers = {int(next(loader)[1]) for _ in range(4)}
    print("workers", *sorted(workers), flush=True)
    while not stopped:
        next(loader)
    after = [int(next(loader)[1]) for _ in range(20)]  # the workers go on after the group's SIGTERM
    print("batches after SIGTERM from", sorted(set(after)), flush=True)
"""


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_loader_workers_outlive_a_process_group_sigterm_and_end_with_their_rank(tmp_path, start):
    script = tmp_path / "rank.py"
    script.write_text(_LOADER)
    proc = subprocess.Popen([sys.executable, str(script), start], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    first = proc.stdout.readline().split()
    assert first[0] == "workers" and len(first) == 3, first + [proc.stderr.read()]
    workers = [int(pid) for pid in first[1:]]
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the workers, and the fork server if any
    assert {p.pid for p in helpers} >= set(workers)
    os.killpg(proc.pid, signal.SIGTERM)  # as torchrun forwards its SIGTERM, or SLURM signals a step
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert sorted(json.loads(out.split("from", 1)[1])) == sorted(workers)
    alive = still_running(helpers)  # each ends with its rank
    assert not alive, alive


# ----------------------------------------------------------------------------------------------------
# The launches: 2 gloo ranks, real shards, real torchrun / deepspeed, real signals
# ----------------------------------------------------------------------------------------------------

STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("health_data")
    index, tok = tiny_shards(root)
    return {"index": index, "tok": tok, "root": root}


def overrides(data, steps: int, **extra) -> list:
    """The launches' settings; a 60 s hang watchdog, so that a launch which hangs by mistake ends within minutes
    with every rank's stacks (``hang_report``) instead of running into the test's timeout in silence."""
    return tiny_overrides(data["index"], data["tok"], steps, MB,
                          **{"data.val": "", "train.hang_timeout_s": 60, **extra})


def hang_report(run_dir: Path) -> str:
    """The watchdog's stack dumps of a launch that hung, for an assertion message."""
    return "".join(f"\n==== {p}\n{p.read_text()}" for p in sorted((run_dir / "hang").glob("rank*.txt")))


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNIMLIP_LOG_SAMPLE_KEYS": "1", **extra}


def torchrun(run_dir: Path, ovr: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir), *ovr]


def records(run_dir: Path) -> list:
    """Every complete line of metrics.jsonl, in order."""
    text = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def latest(run_dir: Path):
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


class Launch:
    """A launch in its own session, its output collected by a thread; ``wait_for`` polls while it runs."""

    def __init__(self, cmd: list, env: dict, run_dir: Path):
        self.run_dir = run_dir
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, what: str, predicate) -> None:
        deadline = time.time() + TIMEOUT
        while not predicate():
            assert self.proc.poll() is None, f"the launch ended before {what}:\n" + "".join(self.lines[-60:]) + \
                hang_report(self.run_dir)
            assert time.time() < deadline, f"no {what} after {TIMEOUT} s"
            time.sleep(0.05)

    def finish(self) -> str:
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=30)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def killed(data):
    """Launch A: kill -9 of torchrun once step 5 is logged (the latest checkpoint is step 4). One rank's loader is
    slowed by 0.3 s a batch, so the kill lands well before step 8's checkpoint (idle, a step takes 0.1 s here)."""
    run_dir = data["root"] / "run"
    launch = Launch(torchrun(run_dir, overrides(data, STEPS)), _env(UNIMLIP_FAULT_SLOW_DATA="1:0.3"), run_dir)
    launch.wait_for("step 5", lambda: latest(run_dir) and max((r["step"] for r in records(run_dir)
                                                               if r["split"] == "train"), default=0) >= 5)
    job = psutil.Process(launch.proc.pid)
    tree = job.children(recursive=True)  # the two ranks and their loader workers
    checkpoint = run_dir / "checkpoints" / latest(run_dir)
    files = {p.relative_to(checkpoint): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    holder = json.loads((run_dir / "run.lock").read_text())
    job.send_signal(signal.SIGKILL)
    t0 = time.time()
    left = still_running(tree)
    for p in left:
        p.kill()
    return {"run_dir": run_dir, "launcher": job.pid, "left": left, "seconds": time.time() - t0,
            "log": launch.finish(), "checkpoint": checkpoint, "files": files, "holder": holder,
            "tree": [p.pid for p in tree]}


def test_kill9_of_the_launcher_leaves_no_rank_running(killed):
    assert killed["left"] == [], [(p.pid, p.name()) for p in killed["left"]]
    print(f"every rank and loader worker gone {killed['seconds']:.1f} s after kill -9 of torchrun")
    gone = [line for line in killed["log"].splitlines() if "its launcher (torchrun, PID" in line]
    assert sorted(line.split(":")[0] for line in gone) == ["unimlip-train rank 0", "unimlip-train rank 1"], gone
    assert all(f"PID {killed['launcher']}) is gone; exiting now (status 129)" in line for line in gone)
    assert "Traceback" not in killed["log"]
    # the last complete checkpoint is untouched; the lock is left to its next owner (its holder's process is gone)
    from unimlip_train.engine.checkpoint import damage

    checkpoint = killed["checkpoint"]
    assert latest(killed["run_dir"]) == checkpoint.name == "step_0000004" and damage(str(checkpoint)) == ""
    assert {p.relative_to(checkpoint): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()} == \
        killed["files"]
    assert json.loads((killed["run_dir"] / "run.lock").read_text()) == killed["holder"]
    assert killed["holder"]["pid"] in killed["tree"]  # rank 0, gone: the next launch takes the lock over


@pytest.fixture(scope="module")
def terminated(data, killed):
    """Launch B: resumes, one rank's loader slowed by 0.3 s a batch; SIGTERM to torchrun once step 6 is logged."""
    run_dir = killed["run_dir"]
    launch = Launch(torchrun(run_dir, overrides(data, STEPS)), _env(UNIMLIP_FAULT_SLOW_DATA="1:0.3"), run_dir)
    launch.wait_for("step 6", lambda: any(line.startswith("step 6/") for line in launch.lines))
    os.kill(launch.proc.pid, signal.SIGTERM)  # torchrun forwards it to each rank's process group, workers too
    log = launch.finish()
    return {"run_dir": run_dir, "log": log, "returncode": launch.proc.returncode, "records": records(run_dir)}


def test_sigterm_to_torchrun_checkpoints_without_a_traceback(terminated):
    log, run_dir = terminated["log"], terminated["run_dir"]
    assert "taking over the lock" in log and "is gone" in log  # launch A's rank 0 held it
    assert "resumed from" in log and "step_0000004 at step 4" in log
    assert log.count("received SIGTERM: checkpointing after this step") == 2, log[-3000:]
    step = int(log.split("unimlip-train: preempted at step ")[1].split(";")[0])
    assert 6 <= step < 12 and latest(run_dir) == f"step_{step:07d}"
    assert f"checkpoint step {step} ->" in log
    # no rank failed (each exited 0, as the exit-status table says) and none printed a traceback; torchrun itself
    # reports the SIGTERM it got with its own SignalException and exits 1
    assert "ChildFailedError" not in log and "exitcode" not in log, log[-3000:]
    rank_frames = [line for line in log.splitlines() if 'File "' in line and "unimlip_train" in line]
    assert not rank_frames and "DataLoader worker" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert terminated["returncode"] == 1 and "SignalException: Process" in log


def test_stragglers_name_the_rank_with_the_slow_loader(terminated):
    host = socket.gethostname()
    train = [r for r in terminated["records"] if r["split"] == "train" and r["step"] > 5]
    assert train, terminated["log"][-3000:]
    for r in train:  # rank 1 waits 0.3 s for each batch (UNIMLIP_FAULT_SLOW_DATA=1:0.3)
        assert r["slowest"] == f"{host}:1" and r["slowest_rank"] == 1.0, r
        assert r["rank_data_wait_s/1"] >= 0.3 > r["rank_data_wait_s/0"], r
        assert r["step_s_max"] >= max(r["rank_step_s/0"], r["rank_step_s/1"]) - 1e-9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(terminated["run_dir"] / "tb"))
    acc.Reload()
    waits = {e.step: e.value for e in acc.Scalars("train/rank_data_wait_s/1")}
    assert all(waits[r["step"]] == pytest.approx(r["rank_data_wait_s/1"]) for r in train)
    assert {e.step: e.value for e in acc.Scalars("train/slowest_rank")}[train[-1]["step"]] == 1.0
    assert f"slowest {host}:1" in terminated["log"]


@pytest.fixture(scope="module")
def spiked(data, terminated):
    """Launch C: the rerun, with the update of step 12 made to diverge (UNIMLIP_FAULT_SPIKE=12)."""
    run_dir = terminated["run_dir"]
    resumed_at = int(latest(run_dir).split("_")[1])
    out = subprocess.run(torchrun(run_dir, overrides(data, STEPS)), env=_env(UNIMLIP_FAULT_SPIKE="12"),
                         capture_output=True, text=True, timeout=TIMEOUT)
    return {"run_dir": run_dir, "out": out, "resumed_at": resumed_at, "records": records(run_dir)}


def test_the_rerun_resumes_where_sigterm_checkpointed(spiked):
    n, out = spiked["resumed_at"], spiked["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:] + hang_report(spiked["run_dir"])
    assert f"resumed from {spiked['run_dir']}/checkpoints/step_{n:07d} at step {n}" in out.stdout


def test_a_diverging_update_is_rolled_back_and_the_run_finishes(spiked):
    out, recs, run_dir = spiked["out"], spiked["records"], spiked["run_dir"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (event,) = [r for r in recs if r.get("event") == "rollback"]
    at = recs.index(event)
    before = {r["step"]: r["loss"] for r in recs[:at] if r["split"] == "train"}
    # first: the injected update really diverged, the logged losses after it above 10 x the running median
    median = statistics.median([before[s] for s in range(max(1, 13 - 50), 13)])
    assert all(before[s] > 10 * median for s in (13, 14, 15)), (median, before)
    assert all(before[s] < 2 * median for s in range(1, 13))
    # then the rollback: to step 8, the newest checkpoint before the update of step 12 (step 12's holds it)
    assert event["to_step"] == 8 and event["first_spike_step"] == 13 and 15 <= event["from_step"] <= 17
    assert event["skipped_samples"] == (event["from_step"] - 8) * 2 * MB
    assert event["median"] == pytest.approx(median, rel=0.5)  # the guard's median is of the larger rank loss
    (rollback,) = [json.loads(line) for line in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    assert rollback["removed_checkpoints"] == ["step_0000012"] and rollback["steps_without_keys"] == 0
    logged = {}  # the keys each rank read at each step, first time round (the debug log of launch C)
    for rank in (0, 1):
        for line in (run_dir / "debug" / f"sample_keys.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["start"] == spiked["resumed_at"]:
                logged.setdefault((rank, rec["step"]), rec["keys"])
    skipped = [k for (rank, step), keys in logged.items() if 8 < step <= event["from_step"] for k in keys]
    assert sorted(rollback["keys"]) == sorted(skipped) and len(skipped) == event["skipped_samples"]
    # after it: steps 9.. trained again on new data, normal losses, to the last step
    after = [r for r in recs[at:] if r["split"] == "train"]
    assert [r["step"] for r in after] == list(range(9, STEPS + 1))
    assert all(r["loss"] < 2 * median for r in after)
    summary = recs[-1]
    assert summary["split"] == "summary" and summary["status"] == "finished" and summary["step"] == STEPS
    assert summary["rollbacks"] == 1 and summary["rollback_skipped_samples"] == event["skipped_samples"]
    assert latest(run_dir) == f"step_{STEPS:07d}"
    assert "rollback 1 of at most 3" in out.stdout and "no checkpoint while a loss spike is pending" in out.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()  # each step once, the values of the run that was kept; the abandoned branch under health/
    final = {r["step"]: r["loss"] for r in recs if r["split"] == "train"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(s, pytest.approx(final[s], rel=1e-6)) for s in range(1, STEPS + 1)]
    abandoned = {e.step: e.value for e in acc.Scalars("health/abandoned_loss")}
    assert all(abandoned[s] > event["limit"] for s in (13, 14, 15))
    assert [(e.step, e.value) for e in acc.Scalars("health/rollbacks")] == [(8, 1.0)]


def test_a_hang_ends_the_job_with_status_4_two_stack_dumps_and_the_hung_summary(data):
    """UNIMLIP_FAULT_HANG=1:6: rank 1 sleeps before step 6, rank 0 waits in the step's first collective. Under
    DeepSpeed's launcher, which exits with its ranks' status (torchrun reports each rank's "exitcode: 4" and
    exits 1)."""
    run_dir = data["root"] / "hang"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "unimlip_train.cli.train",
           "--config", CONFIG, "--run-dir", str(run_dir), *overrides(data, 24, **{"train.hang_timeout_s": 20})]
    t0 = time.time()
    out = subprocess.run(cmd, env=_env(UNIMLIP_FAULT_HANG="1:6"), capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.time() - t0
    assert out.returncode == 4 and seconds < 180, (seconds, out.stdout[-3000:] + out.stderr[-3000:])
    print(f"hung job ended after {seconds:.0f} s")
    stuck, waiting = (run_dir / "hang" / "rank1.txt").read_text(), (run_dir / "hang" / "rank0.txt").read_text()
    assert "rank 1 of 2" in stuck and "faults.py" in stuck and "time.sleep(3600)" in stuck
    assert "rank 0 of 2" in waiting and "Thread MainThread" in waiting and "forward_backward_step" in waiting
    # each rank's loader worker printed its own stacks (faulthandler, on the watchdog's SIGUSR1) to stderr
    assert out.stderr.count("(most recent call first)") >= 2 and "_utils/worker.py" in out.stderr, out.stderr[-3000:]
    hung = [r for r in records(run_dir) if r.get("status") == "hung"]
    assert len(hung) == 1 and records(run_dir)[-1] == hung[0]
    assert hung[0]["split"] == "summary" and hung[0]["step"] == 5 and hung[0]["ranks_dumped"] == [0, 1]
    assert hung[0]["last_collective"]["0"].startswith("forward: the embedding all-gathers")
    logs = out.stdout + out.stderr
    assert logs.count("no progress for") == 2 and "ending the job (status 4)" in logs
    # no traceback ('File "...", line N, in f'; the workers' faulthandler stacks have no comma before 'in')
    assert not [line for line in logs.splitlines() if 'File "' in line and "unimlip_train" in line and ", in " in line]


def test_a_spike_past_max_rollbacks_stops_the_run_with_status_5(data):
    """One process, train.max_rollbacks=0: the first confirmed spike stops the run with one message, a diverged
    summary line and exit status 5; the checkpoint written after the divergent update stays (nothing rolled back)."""
    run_dir = data["root"] / "diverged"
    cmd = ["unimlip-train", "--config", CONFIG, "--run-dir", str(run_dir),
           *overrides(data, 16, **{"train.max_rollbacks": 0})]
    out = subprocess.run(cmd, env=_env(UNIMLIP_FAULT_SPIKE="12"), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 5, out.stdout[-3000:] + out.stderr[-3000:]
    message = [line for line in out.stderr.splitlines() if line.startswith("unimlip-train:")]
    assert len(message) == 1 and "0 rollbacks already (train.max_rollbacks=0)" in message[0], out.stderr[-3000:]
    assert "steps 13-15" in message[0] and "Traceback" not in out.stderr
    summary = records(run_dir)[-1]
    assert summary["split"] == "summary" and summary["status"] == "diverged" and summary["rollbacks"] == 0
    assert not [r for r in records(run_dir) if r.get("event") == "rollback"]
    assert not (run_dir / "rollbacks.jsonl").exists()
