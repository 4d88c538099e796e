"""Multi-node, on one machine: a real 2-node SLURM (``launch/local_cluster.sh up --nodes 2``: nodes xn1 and xn2,
each with its own hostname and loopback address), training jobs across both nodes, a USR2 requeue, and a node
lost mid-run (``local_cluster.sh kill-node``: SIGKILL of the node's slurmd and of every process on it).

The references are independent of the launcher: a one-node ``torchrun --nproc_per_node 2`` run of the same config
(per-step losses, every rank's sample keys), the shards themselves (the train split's keys), ``sacct`` for job
states. Each rank's hostname comes from ``RUN_DIR/world.json``, written at every launch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from slurm_jobs import (
    CLUSTER_SCRIPT,
    TINY,
    cluster_up,
    job_id_of,
    metrics,
    sacct_state,
    steps_logged,
    submit,
    synthetic_shards_in,
    wait_done,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.timeout(600)]

MB, STEPS, GLOBAL_BATCH = 4, 12, 8  # 86 train samples: 10 steps of 2 x 4 per epoch, so epoch 1 begins at step 11
KEYS_ENV = {"UNIMLIP_LOG_SAMPLE_KEYS": "1"}


SUBMITTED: list[str] = []  # this module's jobs, cancelled at the end: a failed test leaves none waiting


@pytest.fixture(scope="module")
def cluster2():
    """Two nodes for this module; one again afterwards (what the other SLURM tests use)."""
    yield cluster_up(nodes=2)
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True, timeout=60)
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", "--nodes", "1"], capture_output=True, timeout=600)


def submit_job(*args: str, env: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
    """``unimlip-submit`` ARGS; (job id, the completed command)."""
    done = submit(*args, env=env)
    SUBMITTED.append(job_id_of(done.stdout))
    return SUBMITTED[-1], done


def node_up(nodes: int = 2) -> None:
    """Start a killed node again (``up`` restarts every slurmd that is not running)."""
    done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", "--nodes", str(nodes)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr


def kill_node(name: str) -> None:
    done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "kill-node", name], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards_in(tmp_path_factory.mktemp("syn2") / "shards")


def overrides(shards: Path, *extra: str) -> list[str]:
    return [f"data.train={shards / 'index.json'}", f"data.val={shards / 'index.json'}", "data.num_workers=0",
            "data.image_size=32", f"train.micro_batch_size={MB}", f"train.steps={STEPS}", "train.log_every=1",
            "train.checkpoint_every=3", "train.warmup_steps=2", "train.eval_every=0", *extra]


def train_job(run_dir: Path, shards: Path, partition: str, nodes: str, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "--run-dir", str(run_dir), "--nodes", nodes, "--tasks-per-node", "1",
            "--cpus-per-task", "1", "--partition", partition, "--time", "00:15:00", *overrides(shards, *extra)]


def with_keys_log() -> dict:
    return {**os.environ, **KEYS_ENV}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """The same config as one-node torchrun, 2 processes, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unimlip_train.cli.train", "--config", str(TINY), "--run-dir", str(run_dir), *overrides(shards)]
    done = subprocess.run(cmd, env={**with_keys_log(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


def world(run_dir: Path) -> dict:
    return json.loads((run_dir / "world.json").read_text())


def sample_keys(run_dir: Path) -> list[dict]:
    """Every sample-key line of every rank file, with its rank."""
    lines = []
    for path in sorted((run_dir / "debug").glob("sample_keys.rank*.jsonl")):
        rank = int(path.name.split(".")[1].removeprefix("rank"))
        lines += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return lines


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    """Per step within 1e-6 of the reference; every step of the run exactly once."""
    rows, ref = metrics(run_dir), losses(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    worst = max(abs(r["loss"] - ref[r["step"]]) for r in rows)
    assert worst <= 1e-6, [(r["step"], r["loss"], ref[r["step"]]) for r in rows]


def train_keys(shards: Path) -> set[str]:
    """The train split's sample keys, read from the tar files (the naive count)."""
    index = json.loads((shards / "index.json").read_text())
    keys = set()
    for shard in index["splits"]["train"]["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            keys |= {Path(name).name.split(".")[0] for name in tar.getnames()}
    return keys


# ------------------------------------------------------------------------------------------------ the tests


def test_two_node_job_equals_one_node_torchrun(tmp_path, cluster2, shards, reference):
    """One task on each of two nodes: the same losses and, rank for rank, the same samples as two torchrun
    processes on one machine (global ranks, loader split by global rank, rendezvous on the first node)."""
    run_dir = tmp_path / "run"
    job_id, done = submit_job(*train_job(run_dir, shards, cluster2, "2"), env=with_keys_log())
    assert "environment passed into the job: UNIMLIP_LOG_SAMPLE_KEYS=1" in done.stdout
    assert wait_done(job_id) == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]

    assert_same_losses(run_dir, reference)
    by_step = {(k["rank"], k["step"]): k["keys"] for k in sample_keys(run_dir)}
    assert by_step == {(k["rank"], k["step"]): k["keys"] for k in sample_keys(reference)}
    assert world(run_dir) | {"history": None, "time": None} == {
        "launch": 1, "world_size": 2, "hosts": ["xn1", "xn2"], "slurm_job_id": job_id, "slurm_restart_count": 0,
        "slurm_nodelist": "xn[1-2]", "history": None, "time": None}
    assert world(reference)["hosts"] == [socket.gethostname()] * 2 and world(reference)["slurm_job_id"] is None
    rank1_log = next((run_dir / "slurm").glob(f"{job_id}/{job_id}_1_log.out")).read_text()
    assert "rank 1/2 (local 0), rendezvous xn1:" in rank1_log


def test_two_node_job_requeued_by_usr2_finishes_with_the_same_losses(tmp_path, cluster2, shards, reference):
    run_dir = tmp_path / "run"
    job_id, done = submit_job(*train_job(run_dir, shards, cluster2, "2"))
    log_path = Path(job_id_of(done.stdout, "stdout"))
    wait_for("step 2", lambda: steps_logged(run_dir) >= 2, job_id)
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)
    assert wait_done(job_id) == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]

    assert f"requeued {job_id}" in log_path.read_text()
    assert_same_losses(run_dir, reference)
    launch = world(run_dir)
    assert (launch["launch"], launch["hosts"], launch["slurm_restart_count"]) == (2, ["xn1", "xn2"], 1)
    assert [(w["launch"], w["hosts"], w["slurm_restart_count"]) for w in launch["history"]] == [(1, ["xn1", "xn2"], 0)]


def test_elastic_job_loses_a_node_and_finishes_on_the_other(tmp_path, cluster2, shards):
    """``--nodes 1-2``: two nodes at first; xn1 (rank 0, the rendezvous host and the batch script's node) dies
    mid-epoch; SLURM requeues the job, which resumes on xn2 alone with the same global batch and trains the rest
    of epoch 0 exactly once."""
    run_dir = tmp_path / "run"
    job_id, done = submit_job(*train_job(run_dir, shards, cluster2, "1-2", f"train.global_batch_size={GLOBAL_BATCH}"),
                              env=with_keys_log())
    wait_for("a checkpoint on two nodes", lambda: steps_logged(run_dir) >= 4, job_id)
    assert world(run_dir)["hosts"] == ["xn1", "xn2"]
    kill_node("xn1")
    try:
        state = wait_done(job_id)
    finally:
        node_up()
    assert state == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]

    launch = world(run_dir)
    assert (launch["launch"], launch["world_size"], launch["hosts"], launch["slurm_restart_count"]) == (
        2, 1, ["xn2"], 1)
    assert [(w["world_size"], w["hosts"]) for w in launch["history"]] == [(2, ["xn1", "xn2"])]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert [r["step"] for r in metrics(run_dir)][-1] == STEPS

    # The steps that count: launch 1's up to the checkpoint launch 2 resumed from, then launch 2's.
    lines = sample_keys(run_dir)
    (resumed_at,) = {line["start"] for line in lines} - {0}
    assert resumed_at >= 3  # the kill came after launch 1's first checkpoint
    kept = [line for line in lines if (line["start"] == 0 and line["step"] <= resumed_at) or line["start"] == resumed_at]
    assert {line["rank"] for line in kept if line["start"] == resumed_at} == {0}  # one rank after the loss
    epoch0 = [key for line in kept if line["epoch"] == 0 for key in line["keys"]]
    everything = train_keys(shards)
    assert len(epoch0) == len(set(epoch0)), "a sample of epoch 0 was trained twice"
    assert set(epoch0) <= everything
    # None missing beyond the final shape's remainder: less than one global batch at the end of the epoch.
    assert len(everything - set(epoch0)) < GLOBAL_BATCH, sorted(everything - set(epoch0))


def test_two_node_job_that_loses_a_node_waits_for_it(tmp_path, cluster2, shards, reference):
    """``--nodes 2`` and xn2 dies: SLURM requeues the job, which waits (``unimlip-submit status`` says why) until
    the node is back, then resumes from its last checkpoint and finishes with the uninterrupted losses."""
    run_dir = tmp_path / "run"
    job_id, done = submit_job(*train_job(run_dir, shards, cluster2, "2"))
    wait_for("a checkpoint", lambda: steps_logged(run_dir) >= 4, job_id)
    kill_node("xn2")
    try:
        why = "waiting for 2 nodes: 1 of 2 is down (xn2)"

        def waits() -> bool:
            return why in submit("status", "--run-dir", str(run_dir)).stdout

        wait_for("a wait for its second node", waits, job_id, timeout=120)
        assert sacct_state(job_id) == "PENDING"
        status = submit("status", "--run-dir", str(run_dir)).stdout
        assert "requeued 1x" in status and "last launch 1 of" in status, status
    finally:
        node_up()
    assert wait_done(job_id) == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]

    launch = world(run_dir)
    assert (launch["launch"], launch["hosts"], launch["slurm_restart_count"]) == (2, ["xn1", "xn2"], 1)
    # Steps after the checkpoint that the dead launch had logged appear again, with the same losses.
    rows, ref = metrics(run_dir), losses(reference)
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    assert max(abs(r["loss"] - ref[r["step"]]) for r in rows) <= 1e-6
