"""The launchers against a real one-node SLURM (``launch/local_cluster.sh up``: slurmctld + slurmd + munge +
slurmdbd on loopback), driven through the ``unimlip-submit`` CLI as a user would.

Job states are read with ``sacct`` directly (independent of the launcher's own status code), training
results from the run dir (metrics.jsonl, checkpoints/, TensorBoard event files), shard results by comparison
with a single-process ``unimlip-shard`` run on the same real images and reports.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import IU_REPORTS_TGZ, PNEUMONIAMNIST_NPZ
from slurm_jobs import (
    TINY,
    cluster_up,
    job_id_of,
    metrics,
    shard_cli,
    steps_logged,
    submit,
    synthetic_shards_in,
    wait_done,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="session")
def cluster() -> str:
    """The local SLURM with one node (idempotent; skips only where it cannot start, never in CI)."""
    return cluster_up(nodes=1)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    return synthetic_shards_in(tmp_path_factory.mktemp("syn") / "shards")


def train_args(run_dir: Path, shards: Path, partition: str, steps: int, *extra: str) -> list[str]:
    """A 2-rank CPU job on the tiny config: small images, few steps, a metrics line every step."""
    return ["train", "--config", str(TINY), "--run-dir", str(run_dir), "--nodes", "1", "--tasks-per-node", "2",
            "--cpus-per-task", "1", "--partition", partition, "--time", "00:15:00",
            f"data.train={shards / 'index.json'}", f"data.val={shards / 'index.json'}", "data.num_workers=0",
            "data.image_size=32", "train.micro_batch_size=4", f"train.steps={steps}", "train.log_every=1",
            "train.checkpoint_every=4", "train.warmup_steps=2", "train.eval_every=0", *extra]


# ------------------------------------------------------------------------------------------------ CLI


def test_dry_run_prints_script_and_config_without_submitting(tmp_path):
    run_dir = tmp_path / "run"
    done = submit("train", "--config", str(TINY), "--run-dir", str(run_dir), "--nodes", "2", "--gpus-per-node", "4",
                  "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj", "--qos", "high",
                  "--constraint", "a100", "--exclusive", "--mem", "200G", "--comment", "c1", "--dependency",
                  "afterok:1", "--signal-seconds", "300", "train.lr=3e-4", "--dry-run", "train.steps=7")
    script = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --exclusive", "#SBATCH --mem=200G", "#SBATCH --comment=c1",
                 "#SBATCH --dependency=afterok:1", "#SBATCH --signal=USR2@300", "#SBATCH --requeue"):
        assert line in script.splitlines(), line
    resolved = yaml.safe_load(script.split("# ---- resolved config", 1)[1].split("\n", 1)[1])
    assert resolved["train"]["lr"] == 3e-4 and resolved["train"]["steps"] == 7
    assert resolved["run_dir"] == str(run_dir)
    assert "job_id:" not in script and not run_dir.exists()


def test_clear_errors(tmp_path, cluster):
    base = ["train", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), "--tasks-per-node", "2",
            "--time", "00:05:00"]
    # No sbatch on PATH: a login-node problem, said plainly.
    bare = {**os.environ, "PATH": str(tmp_path / "empty")}
    err = submit(*base, "--partition", cluster, expect=2, env=bare).stderr
    assert "sbatch not found on PATH" in err
    # A partition sinfo does not know.
    err = submit(*base, "--partition", "no-such-partition", expect=2).stderr
    assert "unknown partition 'no-such-partition'" in err and cluster in err
    # A run dir that belongs to another config is refused and the differing key named.
    from unimlip_train.config.load import dump_yaml, load_config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_yaml(load_config(str(TINY), ["train.lr=0.5"])))
    err = submit(*base, "--partition", cluster, "train.lr=0.25", expect=2).stderr
    assert "belongs to another config" in err and "train.lr: 0.5 -> 0.25" in err
    assert not (tmp_path / "run" / "submissions.jsonl").exists()
    # Bad time, bad override: errors before anything is submitted.
    assert "--time" in submit(*base, "--partition", cluster, "--time", "soon", expect=2).stderr
    assert "nosuchkey" in submit(*base, "--partition", cluster, "train.nosuchkey=1", expect=2).stderr


# ------------------------------------------------------------------------------------------------ jobs


def test_failing_job_surfaces_as_failed_with_its_error(tmp_path, cluster):
    """An exception in training (missing data) ends as FAILED with the error in the log, not a hang;
    --force lets a run dir of another config be reused."""
    from unimlip_train.config.load import dump_yaml, load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(str(TINY), ["train.lr=0.5"])))
    missing = tmp_path / "no-such-data" / "index.json"
    done = submit("train", "--config", str(TINY), "--run-dir", str(run_dir), "--tasks-per-node", "1",
                  "--partition", cluster, "--time", "00:05:00", f"data.train={missing}", "train.steps=3", "--force")
    job_id = job_id_of(done.stdout)
    assert wait_done(job_id, timeout=300) == "FAILED"
    stderr_log = Path(job_id_of(done.stdout, "stderr")).read_text()
    assert str(missing.parent) in stderr_log, stderr_log[-3000:]
    record = json.loads((run_dir / "submissions.jsonl").read_text().splitlines()[-1])
    assert record["job_id"] == job_id and record["kind"] == "train"
    status = submit("status", "--run-dir", str(run_dir), "--wait", "--timeout", "60", expect=1).stdout
    assert re.search(rf"^\s+{job_id}\s+train\s+FAILED", status, flags=re.M), status


STEPS = 16


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cluster, synthetic_shards) -> Path:
    """An uninterrupted 2-rank job: the reference for the preempted one."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = submit(*train_args(run_dir, synthetic_shards, cluster, STEPS))
    job_id = job_id_of(done.stdout)
    state = wait_done(job_id)
    assert state == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]
    return run_dir


def test_two_rank_job_completes_with_checkpoints_and_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    final = reference_run / "checkpoints" / f"step_{STEPS:07d}"
    assert sorted(p.name for p in final.glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    events = EventAccumulator(str(reference_run / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, STEPS + 1))
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    log = next((reference_run / "slurm").glob("*/*_1_log.out")).read_text()
    assert "rank 1/2" in log  # the second task really was rank 1 of 2


def test_preempted_and_requeued_job_resumes_exactly(tmp_path, cluster, synthetic_shards, reference_run):
    """USR2 (the time-limit warning): checkpoint, self-requeue, resume with no step lost or repeated; then an
    external ``scontrol requeue`` (SIGTERM, then SIGKILL after KillWait): the rerun resumes from the last
    checkpoint. The per-step losses equal the uninterrupted reference run's."""
    run_dir = tmp_path / "run"
    done = submit(*train_args(run_dir, synthetic_shards, cluster, STEPS))
    job_id = job_id_of(done.stdout)
    log_path = Path(job_id_of(done.stdout, "stdout"))
    wait_for("step 2", lambda: steps_logged(run_dir) >= 2, job_id)
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)
    wait_for("its resume", lambda: "requeues so far 1" in log_path.read_text(), job_id)
    resume_step = int(re.search(r"SIGUSR2 received, checkpointed at step (\d+)", log_path.read_text()).group(1))
    assert 2 <= resume_step < STEPS - 4
    wait_for("two steps after its resume", lambda: steps_logged(run_dir) >= resume_step + 2, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_done(job_id) == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]

    log = log_path.read_text()
    assert f"requeued {job_id}" in log and "requeues so far 2" in log
    resumed = [int(s) for s in re.findall(r"resumed from \S+/checkpoints/step_\d+ at step (\d+)", log)]
    assert resumed[0] == resume_step and len(resumed) == 2 and resumed[1] >= resume_step
    on_term = re.search(r"SIGTERM received, checkpointed at step (\d+)", log)
    if on_term:  # the checkpoint fitted in KillWait: the rerun starts exactly there
        assert resumed[1] == int(on_term.group(1))

    rows, ref = metrics(run_dir), metrics(reference_run)
    steps = [r["step"] for r in rows]
    # 1..m without gaps or repeats (across the USR2 requeue), then the rerun from its checkpoint to the end;
    # steps after that checkpoint that the killed run had already logged appear twice, with equal losses.
    m = next((steps[i - 1] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), resumed[1])
    assert steps == list(range(1, m + 1)) + list(range(resumed[1] + 1, STEPS + 1))
    ref_loss = {r["step"]: r["loss"] for r in ref}
    assert [r["loss"] for r in rows] == pytest.approx([ref_loss[s] for s in steps], rel=1e-6)
    ref_seen = {r["step"]: r["samples_seen"] for r in ref}
    assert [r["samples_seen"] for r in rows] == [ref_seen[s] for s in steps]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    status = submit("status", "--run-dir", str(run_dir)).stdout
    assert re.search(rf"^\s+{job_id}\s+train\s+COMPLETED .* requeued 2x", status, flags=re.M), status
    assert f"latest checkpoint step_{STEPS:07d}" in status


def test_preemption_beyond_max_requeues_fails_with_its_checkpoint(tmp_path, cluster, synthetic_shards):
    run_dir = tmp_path / "run"
    done = submit(*train_args(run_dir, synthetic_shards, cluster, STEPS, "--max-requeues", "0"))
    job_id = job_id_of(done.stdout)
    wait_for("step 1", lambda: steps_logged(run_dir) >= 1, job_id)
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)
    assert wait_done(job_id) == "FAILED"
    err = Path(job_id_of(done.stdout, "stderr")).read_text()
    stopped = re.search(r"RequeueLimitReached: preempted at step (\d+) after 0 requeues \(--max-requeues 0\)", err)
    assert stopped, err[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{int(stopped.group(1)):07d}"


def test_a_hung_job_is_requeued_like_a_preempted_one_within_max_requeues(tmp_path, cluster, synthetic_shards):
    """UNIMLIP_FAULT_HANG=1:3 (rank 1 sleeps before step 3, in every run of the job) with train.hang_timeout_s=15
    and --max-requeues 1: the first run dumps both ranks' stacks, writes its hung line and requeues itself; the
    rerun hangs again, is past the limit, and the job fails with its ranks' status 4."""
    run_dir = tmp_path / "run"
    done = submit(*train_args(run_dir, synthetic_shards, cluster, STEPS, "--max-requeues", "1",
                              "train.hang_timeout_s=15"), env={**os.environ, "UNIMLIP_FAULT_HANG": "1:3"})
    job_id = job_id_of(done.stdout)
    assert wait_done(job_id, timeout=480) == "FAILED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]
    exit_code = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "ExitCode", "-j", job_id], capture_output=True,
                               text=True, check=True).stdout.split()
    assert exit_code == ["4:0"], exit_code
    hung = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "summary"]
    assert [r["status"] for r in hung] == ["hung", "hung"]
    assert hung[0]["action"] == f"requeued {job_id} (requeue 1 of at most 1)"
    assert hung[1]["action"].startswith("not requeued: 1 requeues already (--max-requeues 1)")
    assert all(r["step"] == 2 and r["ranks_dumped"] == [0, 1] for r in hung)
    assert "requeues so far 1" in Path(job_id_of(done.stdout, "stdout")).read_text()
    assert "time.sleep(3600)" in (run_dir / "hang" / "rank1.txt").read_text()  # where rank 1 was stuck


def test_eval_job_writes_metrics_into_the_run_dir(cluster, synthetic_shards, reference_run):
    done = submit("eval", "--run-dir", str(reference_run), "--partition", cluster, "--time", "00:05:00",
                  "--tasks-per-node", "1", "--", "retrieval", "--checkpoint", str(reference_run),
                  "--data", str(synthetic_shards / "index.json"), "--batch-size", "16")
    job_id = job_id_of(done.stdout)
    assert wait_done(job_id, timeout=300) == "COMPLETED", Path(job_id_of(done.stdout, "stderr")).read_text()[-3000:]
    (out,) = (reference_run / "eval").glob("retrieval-*.json")
    result = json.loads(out.read_text())
    val = json.loads((synthetic_shards / "index.json").read_text())["splits"]["val"]["samples"]
    assert result["num_samples"] == val
    # against R@1 counted by plain loops over this process's embeddings of the same checkpoint
    from conftest import embed_eval_set, naive_recall_at_1
    from unimlip_train.export import load_for_eval

    model, cfg, tok = load_for_eval(str(reference_run))
    i2t, t2i = naive_recall_at_1(*embed_eval_set(model, cfg, tok, str(synthetic_shards / "index.json")))
    assert (result["i2t_R@1"], result["t2i_R@1"]) == (pytest.approx(i2t), pytest.approx(t2i))
    kinds = [json.loads(line)["kind"] for line in (reference_run / "submissions.jsonl").read_text().splitlines()]
    assert kinds == ["train", "eval"]


# ------------------------------------------------------------------------------------------------ sharding


def _reports(n: int) -> list[str]:
    """FINDINGS + IMPRESSION of the first real IU X-ray reports that have both."""
    out = []
    with tarfile.open(IU_REPORTS_TGZ) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")}
            if sections.get("FINDINGS") and sections.get("IMPRESSION"):
                out.append(f"FINDINGS: {sections['FINDINGS']}\nIMPRESSION: {sections['IMPRESSION']}")
            if len(out) == n:
                return out
    raise AssertionError("not enough reports")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Real chest X-rays (PneumoniaMNIST) with real reports, plus rows the writer must skip."""
    root = tmp_path_factory.mktemp("manifest")
    data = np.load(PNEUMONIAMNIST_NPZ)
    n = 40
    reports = _reports(n)
    rows = []
    for i in range(n):
        Image.fromarray(data["train_images"][i]).save(root / f"img{i:03d}.png")
        label = "pneumonia" if int(data["train_labels"][i][0]) else "normal"
        rows.append({"id": f"study{i:03d}", "image": f"img{i:03d}.png", "text": reports[i],
                     "group": f"patient{i // 2}", "labels": label})
    (root / "broken.png").write_bytes(b"not an image at all")
    rows += [{"id": "broken", "image": "broken.png", "text": reports[0], "group": "px", "labels": "normal"},
             {"id": "missing", "image": "nowhere.png", "text": reports[1], "group": "py", "labels": "normal"},
             {"id": "empty", "image": "img000.png", "text": "  ", "group": "pz", "labels": "normal"}]
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "m.csv"


def test_shard_array_matches_single_process_run(tmp_path, cluster, manifest):
    shard_args = ["manifest", "--manifest", str(manifest), "--shard-size", "6", "--val-fraction", "0.2",
                  "--max-size", "24", "--seed", "3", "--no-progress"]
    single = tmp_path / "single"
    done = shard_cli(*shard_args, "--workers", "1", "--out", str(single))
    assert done.returncode == 0, done.stderr

    arrayed = tmp_path / "arrayed"
    out = submit("shard", "--array-size", "3", "--partition", cluster, "--time", "00:05:00", "--cpus-per-task", "1",
                 "--", *shard_args, "--workers", "2", "--out", str(arrayed)).stdout
    array_id, merge_id = job_id_of(out), job_id_of(out, "merge_job_id")
    assert wait_done(merge_id, timeout=300) == "COMPLETED", Path(job_id_of(out, "stderr")).read_text()[-3000:]
    # polled: the accounting record of an array task can lag behind the merge job's
    assert {wait_done(f"{array_id}_{k}", timeout=60) for k in range(3)} == {"COMPLETED"}

    verify = shard_cli("verify", str(arrayed), "--decode")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    index = json.loads((arrayed / "index.json").read_text())
    assert index == json.loads((single / "index.json").read_text())
    assert index["errors"] == 3 and index["shards"] > 3  # several shards per split, all three bad rows skipped
    assert (arrayed / "errors.jsonl").read_text() == (single / "errors.jsonl").read_text()
    for split in index["splits"].values():
        for shard in split["shards"]:
            assert (arrayed / shard["name"]).read_bytes() == (single / shard["name"]).read_bytes()
    assert not (arrayed / ".unimlip-array").exists()
    status = submit("status", "--run-dir", str(arrayed / ".submit")).stdout
    assert re.search(rf"^\s+{merge_id}\s+merge\s+COMPLETED", status, flags=re.M), status

    # --cluster local: the same jobs as local processes (no scheduler), same result.
    local = tmp_path / "local"
    submit("shard", "--array-size", "2", "--cluster", "local", "--", *shard_args, "--workers", "1", "--out", str(local))
    assert json.loads((local / "index.json").read_text()) == index
