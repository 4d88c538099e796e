"""The training engine on CPU with 2 gloo processes: ZeRO 1/2/3 learn, exact resume after kill -9, a kill
while a checkpoint is written, TensorBoard read-back, export round trip, world-size change (in depth:
``test_elastic.py``); plus unit checks
of the optimizer groups, the schedule and the SLURM environment translation.

Real shards (``unimlip-shard synthetic``), a real tokenizer (``unimlip-shard tokenizer``), real torchrun.
Launches are grouped and shared through module fixtures; the whole file takes about 2-4 minutes.
"""
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import tiny_overrides, tiny_shards

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
TERMS = ["itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm"]
MB = 8  # micro batch per rank
LAUNCH_TIMEOUT = 400

pytestmark = pytest.mark.multiprocess


# ----------------------------------------------------------------------------------------------------
# Fixtures: data, tokenizer, launches
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_data")
    index, tok = tiny_shards(root)
    train_samples = json.loads(Path(index).read_text())["splits"]["train"]["samples"]
    # Naive reference of the epoch length: the train split cut into 2 ranks x 1 worker, whole micro batches.
    steps_per_epoch = (train_samples // 2) // MB
    return {"index": index, "tok": tok, "root": root, "steps_per_epoch": steps_per_epoch,
            "train_samples": train_samples}


def overrides(data, steps, **extra) -> list:
    return tiny_overrides(data["index"], data["tok"], steps, MB, **extra)


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNIMLIP_LOG_SAMPLE_KEYS": "1", **extra}


def train_cmd(run_dir, ovr, nproc=2) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + ["-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir), *ovr]


def run(cmd, **env) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return out


def metrics(run_dir) -> dict:
    """step -> the train record written for it."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out[rec["step"]] = rec
    return out


def sample_keys(run_dir) -> dict:
    """(rank, step) -> keys, the last launch that trained that step winning (as with ``metrics``)."""
    out = {}
    for rank in (0, 1):
        for line in (Path(run_dir) / "debug" / f"sample_keys.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"])] = rec["keys"]
    return out


def latest(run_dir):
    p = Path(run_dir) / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


@pytest.fixture(scope="module")
def reference(data):
    """Uninterrupted ZeRO-1 run: one epoch and a bit, checkpoints every 4 steps."""
    steps = data["steps_per_epoch"] + 3
    run_dir = data["root"] / "reference"
    out = run(train_cmd(run_dir, overrides(data, steps)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"dir": run_dir, "steps": steps, "stdout": out.stdout}


@pytest.fixture(scope="module")
def zero23(data):
    """ZeRO-2 and ZeRO-3 trainings in one launch (ZeRO-3 with periodic evaluation)."""
    steps = 8
    jobs = [[CONFIG, str(data["root"] / f"zero{stage}"),
             overrides(data, steps, **{"deepspeed.zero_stage": stage, "train.eval_every": 4 if stage == 3 else 0})]
            for stage in (2, 3)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "engine_worker.py"), json.dumps(jobs)]
    out = run(cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {stage: data["root"] / f"zero{stage}" for stage in (2, 3)}


# ----------------------------------------------------------------------------------------------------
# Multi-process tests
# ----------------------------------------------------------------------------------------------------


def _learned(m: dict) -> None:
    steps = sorted(m)
    first = sum(m[s]["loss"] for s in steps[:2]) / 2
    last = sum(m[s]["loss"] for s in steps[-2:]) / 2
    assert last < first, (first, last)
    for s in steps:
        assert all(k in m[s] for k in ["loss", *TERMS])
        assert math.isfinite(m[s]["loss"])


def test_zero1_2_3_train_and_reduce_the_loss(reference, zero23):
    _learned(metrics(reference["dir"]))
    for stage, run_dir in zero23.items():
        m = metrics(run_dir)
        assert sorted(m) == list(range(1, 9)), stage
        _learned(m)
        state = json.loads((Path(run_dir) / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
        assert (state["zero_stage"], state["step"], state["world_size"]) == (stage, 8, 2)


def test_kill9_resume_is_exact_and_a_kill_while_saving_keeps_the_previous_checkpoint(data, reference):
    steps, run_dir = reference["steps"], data["root"] / "interrupted"
    ovr = overrides(data, steps)
    kill_after = random.randint(5, 7)  # a random step after the first checkpoint (step 4)
    with open(data["root"] / "interrupted.log", "w") as log:
        proc = subprocess.Popen(train_cmd(run_dir, ovr), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + LAUNCH_TIMEOUT
        metrics_file = run_dir / "metrics.jsonl"
        while True:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            done = max(metrics(run_dir), default=0) if metrics_file.exists() else 0
            if latest(run_dir) and done >= kill_after:
                break
            time.sleep(0.05)
        holder = json.loads((run_dir / "run.lock").read_text())  # rank 0 of this launch holds the run dir
        assert holder["pid"] in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        # kill -9 of the whole job: torchrun, both ranks (torchrun puts them in their own sessions), loader workers
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in job:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(job, timeout=60)
        proc.wait(timeout=60)
    log_text = (data["root"] / "interrupted.log").read_text()
    assert "finished at step" not in log_text, log_text[-3000:]
    assert (run_dir / "run.lock").exists()  # left by the killed job: stale now, taken over below
    assert latest(run_dir) in ("step_0000004", "step_0000008")

    # Resume, but die (every rank SIGKILLs itself) after the DeepSpeed shards of the last checkpoint are written.
    out = run(train_cmd(run_dir, ovr), UNIMLIP_FAULT_KILL_DURING_SAVE=str(steps))
    assert out.returncode != 0, out.stdout[-3000:]
    partial = run_dir / "checkpoints" / f"step_{steps:07d}"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert latest(run_dir) == "step_0000008"  # the previous complete checkpoint stays the latest

    out = run(train_cmd(run_dir, ovr))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step 8" in out.stdout
    assert "taking over the lock" in out.stdout and "is gone" in out.stdout
    assert not (run_dir / "run.lock").exists()
    assert latest(run_dir) == f"step_{steps:07d}"
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_0000008", f"step_{steps:07d}"]  # the last K=2 complete ones; partial ones gone

    ref, got = metrics(reference["dir"]), metrics(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    train_lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in train_lines if r["split"] == "train"]
    assert train_steps == list(range(1, steps + 1))  # the killed launch's steps past its checkpoint are dropped
    for s in ref:  # bit-identical on CPU fp32 in most launches; the allowance covers alignment-dependent
        for k in ["loss", *TERMS, "temperature"]:  # rounding of vectorised kernels in a fresh process
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-6, abs=1e-7), (s, k, got[s][k], ref[s][k])
    ref_state = json.loads((reference["dir"] / "checkpoints" / latest(reference["dir"]) / "trainer_state.json")
                           .read_text())
    got_state = json.loads((run_dir / "checkpoints" / latest(run_dir) / "trainer_state.json").read_text())
    assert got_state["samples_seen"] == ref_state["samples_seen"] == steps * 2 * MB

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()  # the killed launch's steps after its checkpoint are purged: each step once, resumed values
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(s, pytest.approx(ref[s]["loss"], rel=1e-6)) for s in range(1, steps + 1)]

    ref_keys, got_keys = sample_keys(reference["dir"]), sample_keys(run_dir)
    assert got_keys == ref_keys  # the same samples at the same step on the same rank
    spe = data["steps_per_epoch"]
    for epoch_steps in (range(1, spe + 1), range(spe + 1, steps + 1)):
        seen = [k for (rank, step), keys in got_keys.items() if step in epoch_steps for k in keys]
        assert len(seen) == len(set(seen)) == len(epoch_steps) * 2 * MB  # no sample twice within an epoch


def test_tensorboard_has_every_term_at_every_step(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference["dir"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    m = metrics(reference["dir"])
    for term in ["loss", *TERMS, "temperature"]:
        events = acc.Scalars(f"train/{term}")
        assert [e.step for e in events] == list(range(1, reference["steps"] + 1)), term
        for e in events:
            assert e.value == pytest.approx(m[e.step][term], rel=1e-6)
    for tag in ("train/lr/image", "train/lr/text", "train/lr/head", "train/lr/temperature", "train/grad_norm",
                "train/samples_per_s", "train/samples_per_s_per_gpu", "train/data_wait_frac", "train/skipped_steps"):
        assert tag in tags, tag


def test_validation_scalars_under_zero3(data, zero23, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import embed_eval_set, naive_recall_at_1
    from unimlip_train.export import export, load_for_eval

    acc = EventAccumulator(str(zero23[3] / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/i2t_R@1")] == [4, 8]
    # Step 8's values, computed live from ZeRO-3's gathered weights, against R@1 counted by plain loops over the
    # embeddings of the exported (consolidated) step-8 checkpoint.
    model, cfg, tok = load_for_eval(export(str(zero23[3]), str(tmp_path / "export")))
    i2t, t2i = naive_recall_at_1(*embed_eval_set(model, cfg, tok, data["index"]))
    assert acc.Scalars("val/i2t_R@1")[-1].value == pytest.approx(i2t)
    assert acc.Scalars("val/t2i_R@1")[-1].value == pytest.approx(t2i)
    # the trainer's pictures: the view pairs at the first step, retrieval examples at each evaluation
    assert [e.step for e in acc.Images("images/augmented_views")] == [1]
    assert [e.step for e in acc.Images("val_examples/0")] == [4, 8]


def test_export_round_trip_gives_identical_embeddings(data, reference, zero23, tmp_path):
    from unimlip_train.data.eval_loader import build_eval_loader
    from unimlip_train.engine.checkpoint import consolidated_state_dict, resolve_checkpoint
    from unimlip_train.export import load_for_eval

    # ZeRO-1: DeepSpeed's module file holds the full fp32 weights; the master weights must agree with it exactly.
    tag = resolve_checkpoint(str(reference["dir"]))
    module = torch.load(os.path.join(tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)
    direct = {k[len("model."):]: v for k, v in module["module"].items() if k.startswith("model.")}
    consolidated = consolidated_state_dict(tag)
    assert direct.keys() == consolidated.keys()
    assert all(torch.equal(direct[k], consolidated[k]) for k in direct)

    # ZeRO-3 (partitioned weights): export, load without DeepSpeed, compare with the training checkpoint.
    out = subprocess.run([sys.executable, "-m", "unimlip_train.cli.export", str(zero23[3]), "--out",
                          str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer"}
    from_ckpt, cfg, tok = load_for_eval(str(zero23[3]))
    from_export, cfg2, tok2 = load_for_eval(str(tmp_path / "export"))
    assert cfg2 == cfg and tok2.get_vocab() == tok.get_vocab()
    batch = next(iter(build_eval_loader(cfg, data["index"], tok, 16, 0, 1, split="val")))
    with torch.no_grad():
        for fn in ("encode_image",):
            assert torch.equal(getattr(from_ckpt, fn)(batch["image"]), getattr(from_export, fn)(batch["image"]))
        a = from_ckpt.encode_text(batch["input_ids"], batch["attention_mask"])
        b = from_export.encode_text(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


def test_world_size_change_resumes_with_one_line_saying_what_carried_over(data, reference):
    """2 -> 1 rank from the reference's last checkpoint, 3 steps into epoch 1 (``test_elastic.py`` checks the
    moments, the samples and the round trips; this is the line and the counters)."""
    steps = reference["steps"] + 2
    run_dir = data["root"] / "one_rank"
    tag = reference["dir"] / "checkpoints" / f"step_{reference['steps']:07d}"
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir),
           "--resume", str(tag), *overrides(data, steps)]
    out = run(cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    left = data["train_samples"] - 3 * 2 * MB  # epoch 1 after the reference's 3 steps into it
    assert (f"resumed {tag} at step {reference['steps']}: from 2 ranks / ZeRO 1 to 1 ranks / ZeRO 1, optimizer "
            f"moments kept, {left} samples of epoch 1 remaining, spread over 1 × 1 loader units") in out.stdout
    m = metrics(run_dir)
    assert sorted(m) == [steps - 1, steps]  # the step counter and schedule continue
    state = json.loads((run_dir / "checkpoints" / f"step_{steps:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["samples_seen"] == reference["steps"] * 2 * MB + 2 * MB


def test_resume_with_a_longer_run_follows_the_new_schedule(data, reference):
    """Resuming at the end of an N-step run with train.steps=N+2 must continue the cosine over N+2 steps (not
    stay at the final lr of the saved N-step schedule) and take the new base lr."""
    n = reference["steps"]
    run_dir = data["root"] / "longer"
    tag = reference["dir"] / "checkpoints" / f"step_{n:07d}"
    out = run(train_cmd(run_dir, ["--resume", str(tag), *overrides(data, n + 2, **{"train.lr": 1e-3})]))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = metrics(run_dir)
    warmup, min_ratio = 2, 0.1  # overrides() and configs/tiny_cpu.yaml
    progress = (n + 1 - warmup) / (n + 2 - warmup)
    want = 1e-3 * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert math.isclose(m[n + 1]["lr/head"], want, rel_tol=1e-6), (m[n + 1]["lr/head"], want)


def test_sigusr2_checkpoints_and_exits_as_preempted(data):
    run_dir = data["root"] / "preempted"
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir),
           *overrides(data, 500, **{"train.checkpoint_every": 0})]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + LAUNCH_TIMEOUT
    while not ((run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # what `sbatch --signal=USR2@...` delivers before the time limit
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, out[-3000:]
    state = json.loads((run_dir / "checkpoints" / latest(run_dir) / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 500 and f"preempted at step {state['step']}" in out
    assert latest(run_dir) == f"step_{state['step']:07d}"


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(data, reference, tmp_path):
    """A truncated model_states.pt in the newest checkpoint: --resume auto resumes exactly from the one before,
    naming the damaged one; an explicit --resume of it is a one-line error; all damaged is an error too."""
    from unimlip_train.engine.checkpoint import CheckpointError, CheckpointManager, resolve_checkpoint

    steps = reference["steps"]
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference["dir"] / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / f"step_{steps:07d}"
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])

    explicit = run(["unimlip-train", "--config", CONFIG, "--run-dir", str(tmp_path / "other"), "--resume",
                    str(newest), *overrides(data, steps)])
    assert explicit.returncode == 2 and explicit.stderr.count("\n") == 1, explicit.stderr[-3000:]
    assert str(newest) in explicit.stderr and "mp_rank_00_model_states.pt has" in explicit.stderr

    out = run(train_cmd(run_dir, overrides(data, steps)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"checkpoint {newest} is damaged (mp_rank_00_model_states.pt has" in out.stdout
    assert "resumed from" in out.stdout and "step_0000008 at step 8" in out.stdout
    ref, got = metrics(reference["dir"]), metrics(run_dir)
    assert sorted(got) == list(range(9, steps + 1))
    for s in got:  # the fallback resumed exactly: the uninterrupted run's losses
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-7), s
    assert latest(run_dir) == f"step_{steps:07d}" and not resolve_checkpoint(str(newest)) is None  # rewritten

    (run_dir / "checkpoints" / f"step_{steps:07d}" / "trainer_rank00001.pt").unlink()
    (run_dir / "checkpoints" / "step_0000008" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        CheckpointManager(str(run_dir), 2).latest()
    assert "trainer_rank00001.pt is missing" in str(info.value) and "config.yaml is missing" in str(info.value)


def test_resume_with_another_micro_batch_continues_the_stream(data, reference):
    """Same world size, micro batch 8 -> 6: the stream position is remapped exactly (no "cannot resume")."""
    n = 8
    run_dir = data["root"] / "micro6"
    tag = reference["dir"] / "checkpoints" / f"step_{n:07d}"
    out = run(train_cmd(run_dir, ["--resume", str(tag), *overrides(data, n + 2, **{"train.micro_batch_size": 6})]))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "micro batch 8 -> 6: the data stream continues exactly" in out.stderr
    ref, got = sample_keys(reference["dir"]), sample_keys(run_dir)
    spe = data["steps_per_epoch"]
    per_rank = data["train_samples"] // 2  # one loader worker per rank: one unit each
    batches_left = (per_rank // 6 * 6 - n * MB) // 6  # of epoch 0, in batches of 6
    assert batches_left == 1  # this data set: the second resumed step starts epoch 1
    for rank in (0, 1):
        left = [k for step in range(n + 1, spe + 1) for k in ref[(rank, step)]]  # epoch 0 after 8 x 8 samples
        assert got[(rank, n + 1)] == left[:6]
        assert got[(rank, n + 2)] == ref[(rank, spe + 1)][:6]  # epoch 1 begins as it did with batches of 8


def test_a_checkpoint_of_another_model_is_named_by_its_config_keys(data, reference, tmp_path):
    from unimlip_train.config.load import load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.engine.checkpoint import CheckpointError, check_compatible, resolve_checkpoint
    from unimlip_train.export import export
    from unimlip_train.models.build import build_model

    tag = resolve_checkpoint(str(reference["dir"]))
    tok = load_tokenizer(data["tok"])
    same = load_config(CONFIG, overrides(data, 5))
    check_compatible(tag, same, build_model(same, tok))  # a different train.steps / lr changes no shape
    other = load_config(CONFIG, overrides(data, 5, **{"model.embed_dim": 16, "loss.itm.weight": 0}))
    with pytest.raises(CheckpointError) as info:
        check_compatible(tag, other, build_model(other, tok))
    msg = str(info.value)
    assert "model.embed_dim: 32 -> 16" in msg and "loss.itm.weight: 0.125 -> 0.0" in msg and "\n" not in msg
    assert "image_proj.weight: [32, 32] in the checkpoint, [16, 32] now" in msg
    assert "train.steps" not in msg

    # Evaluation: weights that do not fit the config.yaml beside them are one message, not a load traceback.
    export(tag, str(tmp_path / "export"))
    conf = tmp_path / "export" / "config.yaml"
    edited = yaml.safe_load(conf.read_text())
    edited["model"]["embed_dim"] = 16
    conf.write_text(yaml.safe_dump(edited))
    out = subprocess.run(["unimlip-eval", "retrieval", "--checkpoint", str(tmp_path / "export"), "--data",
                          data["index"]], env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "weights do not fit the model its config.yaml describes" in out.stderr
    assert "image_proj.weight: [32, 32] in the checkpoint, [16, 32] now" in out.stderr


def test_disk_full_while_checkpointing_is_one_message_and_leaves_latest(data, reference, tmp_path):
    """The checkpoints dir on a small tmpfs: the first checkpoint fits, the second cannot. Every rank stops
    with the same message; the partial checkpoint is gone and latest still names the first."""
    tag = reference["dir"] / "checkpoints" / f"step_{reference['steps']:07d}"
    size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
    run_dir = tmp_path / "full"
    mount = run_dir / "checkpoints"
    mount.mkdir(parents=True)
    pages = int(size * 1.5) // 4096 + 4
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        out = run(train_cmd(run_dir, overrides(data, 8)))
        assert out.returncode != 0, out.stdout[-3000:]
        assert latest(run_dir) == "step_0000004"
        assert sorted(p.name for p in mount.glob("step_*")) == ["step_0000004"]  # nothing partial left
        lines = [line for line in out.stderr.splitlines() if "cannot write checkpoint" in line]
        assert len(lines) == 2 and lines[0].endswith(lines[1].split("unimlip-train: ", 1)[1])  # both ranks
        msg = lines[0]
        assert f"{mount / 'step_0000008'}" in msg and "no space left on device" in msg
        assert "needs about" in msg and "is free there" in msg and "latest is still step_0000004" in msg
        frames = [line for line in out.stderr.splitlines() if 'File "' in line and "unimlip_train/" in line]
        assert not frames, out.stderr[-3000:]  # no traceback from the ranks (torchrun prints its own summary)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_second_job_is_refused_and_ctrl_c_checkpoints_then_exits(data):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group (loader workers included)."""
    run_dir = data["root"] / "ctrl_c"
    cmd = ["unimlip-train", "--config", CONFIG, "--run-dir", str(run_dir),
           *overrides(data, 100_000, **{"train.checkpoint_every": 0})]  # stopped by Ctrl-C long before
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + LAUNCH_TIMEOUT
    while not ((run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    since = time.strftime("%Y-%m-%d", time.localtime())
    second = run(["unimlip-train", "--config", CONFIG, "--run-dir", str(run_dir), *overrides(data, 3)])
    assert second.returncode == 3, second.stderr[-3000:]
    assert second.stderr.count("\n") == 1 and "in use" in second.stderr, second.stderr
    assert f"host {socket.gethostname()}, PID {proc.pid}" in second.stderr and f"since {since}" in second.stderr
    ranks = run(train_cmd(run_dir, overrides(data, 3)))  # two ranks: both refuse before their rendezvous
    assert ranks.returncode != 0 and ranks.stderr.count("is in use by host") == 1, ranks.stderr[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = json.loads((run_dir / "checkpoints" / latest(run_dir) / "trainer_state.json").read_text())["step"]
    assert f"interrupted at step {step}, rerun to resume" in out and latest(run_dir) == f"step_{step:07d}"
    assert sorted(metrics(run_dir)) == list(range(1, step + 1))  # every step once, nothing from the refused job
    assert not (run_dir / "run.lock").exists()


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT only sets the flag (the trainer checkpoints at the next step); the second is the
    default action, delivered by the kernel even while Python is busy."""
    script = ("import os, signal, time\n"
              "from unimlip_train.engine.preemption import PreemptionFlag\n"
              "flag = PreemptionFlag(); flag.install(signal.SIGINT)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "while not flag(): pass\n"
              "print('first: flag set', flag.interrupted, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(30)\n"
              "print('still running')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGINT, out
    assert out.stdout == "first: flag set True\n" and "Ctrl-C again aborts at once" in out.stderr


def test_nonfinite_losses_are_skipped_then_stop_with_a_clear_message(data):
    run_dir = data["root"] / "diverge"
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir),
           *overrides(data, 20, **{"train.lr": 1e30, "train.max_nonfinite_in_row": 3, "train.clip_grad": 0.0})]
    out = run(cmd)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("non-finite loss or gradients on some rank; optimizer step skipped") == 3
    assert "3 non-finite steps in a row" in out.stderr and "train.max_nonfinite_in_row=3" in out.stderr


def test_accumulated_negatives_equal_one_big_micro_batch_and_the_temperature_stays_clamped(data):
    """Through the real engine on 2 ranks: grad_accum 2 x micro batch 8 with accumulated negatives gives the
    loss and the gradient norm of micro batch 16 (the same samples: the stream cuts the same sequence), every
    contrastive term on and deterministic towers. A temperature learning rate that drives log(1/T) below
    ln 1 (random embeddings at a scale near 1 still prefer a higher temperature) shows the in-place clamp after
each optimizer step: it holds at 1, and every step starts there.
    With ``train.negatives=micro`` the terms see fewer negatives, so the loss differs.

    The same launch trains the tiny default with encoder-level feature noise (``all``: every term on, the text
    encoder's dropout, spatial dropout of the feature-level pass, a BatchNorm ResNet tower) with accumulated
    negatives: a literal one-big-batch comparison is impossible there (BatchNorm normalises each micro batch
    with its own statistics, dropout draws differ), so this run checks what the equality rests on: every
    recomputed micro batch reproduces its cached embeddings bit for bit (``accum_replay_max_abs`` = 0; that the
    replay's gradient then equals one loss over the step, with all of this on, is
    tests/test_losses_distributed.py's replay check), and BatchNorm counted exactly one update per micro batch
    (no caching or perturbed pass)."""
    common = {"loss.mlm.weight": 0, "loss.itm.weight": 0, "model.text.dropout": 0.0, "model.image.token_drop": 0.0,
              "loss.itc_feature.weight": 0, "loss.image_feature.weight": 0, "loss.text_feature.weight": 0,
              "train.lr_temperature": 0.5, "model.init_temperature": 0.9,
              "train.checkpoint_every": 0}
    runs = {"big": {"train.micro_batch_size": 16}, "accumulated": {"train.micro_batch_size": 8, "train.grad_accum": 2},
            "micro": {"train.micro_batch_size": 8, "train.grad_accum": 2, "train.negatives": "micro"},
            "bf16": {"train.micro_batch_size": 8, "train.grad_accum": 2, "deepspeed.precision": "bf16",
                     "train.checkpoint_every": 3}}
    jobs = [[CONFIG, str(data["root"] / f"acc_{name}"), overrides(data, 3, **{**common, **extra})]
            for name, extra in runs.items()]
    everything = {"model.image.name": "resnet10t", "model.image.kwargs": "{}", "loss.feature_perturbation": "encoder",
                  "train.micro_batch_size": 8, "train.grad_accum": 2, "train.checkpoint_every": 3}
    jobs.append([CONFIG, str(data["root"] / "acc_all"), overrides(data, 3, **everything)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "engine_worker.py"), json.dumps(jobs)]
    out = run(cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = {name: metrics(data["root"] / f"acc_{name}") for name in runs if name != "bf16"}
    for rank in (0, 1):  # the step's two micro batches are the big one's samples, in order
        micro = [json.loads(line)["keys"] for line in
                 (data["root"] / "acc_accumulated" / "debug" / f"sample_keys.rank{rank}.jsonl").read_text().splitlines()]
        assert sample_keys(data["root"] / "acc_big")[(rank, 1)] == micro[0] + micro[1]
    for key in ("loss", "itc", "image_ssl", "text_ssl", "grad_norm"):
        assert m["accumulated"][1][key] == pytest.approx(m["big"][1][key], rel=1e-5), key
    assert m["micro"][1]["itc"] < m["big"][1]["itc"] - 0.1  # 16 vs 32 candidates: a visibly easier task
    scales = [m[name][s]["logit_scale"] for name in m for s in (1, 2, 3)]
    assert min(scales) == pytest.approx(1.0, rel=1e-6) and min(scales) >= 1.0 - 1e-6, scales
    every = metrics(data["root"] / "acc_all")
    assert all(t in every[s] for t in TERMS for s in (1, 2, 3))
    assert [every[s]["accum_replay_max_abs"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
    from unimlip_train.engine.checkpoint import consolidated_state_dict, resolve_checkpoint

    counters = {k: int(v) for k, v in consolidated_state_dict(resolve_checkpoint(str(data["root"] / "acc_all"))).items()
                if k.endswith("num_batches_tracked")}
    assert len(counters) > 10 and set(counters.values()) == {3 * 2}, counters  # 3 steps x 2 micro batches

    # bf16 with fp32 gradient accumulation puts ZeRO-1 on DeepSpeed's BF16_Optimizer, whose checkpoints its own
    # consolidation refuses: ours reads the fp32 master, which rounds to exactly the bf16 weights trained with.
    tag = resolve_checkpoint(str(data["root"] / "acc_bf16"))
    assert (Path(tag) / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    master = consolidated_state_dict(tag)
    module = torch.load(Path(tag) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert master.keys() == {k[len("model."):] for k in module if k.startswith("model.")}
    assert all(v.dtype == torch.float32 for v in master.values() if v.is_floating_point())
    assert all(torch.equal(v.bfloat16(), module["model." + k].bfloat16()) for k, v in master.items())
    assert any(not torch.equal(v, module["model." + k]) for k, v in master.items())  # more than the bf16 copy


def test_corrupt_shards_are_counted_per_shard_and_too_many_stop_after_a_checkpoint(data):
    """A truncated train shard on 2 ranks: the skipped samples of both ranks are counted, cumulatively, in
    metrics.jsonl and TensorBoard and by shard in the run's summary line; with data.max_skip_fraction below what
    was skipped the run checkpoints, then stops with a message naming the shard."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = data["root"] / "corrupt_shards"
    shutil.copytree(Path(data["index"]).parent, shards)
    index = json.loads((shards / "index.json").read_text())
    name = index["splits"]["train"]["shards"][1]["name"]
    raw = (shards / name).read_bytes()
    (shards / name).write_bytes(raw[: len(raw) // 2])  # truncated: the index still promises every sample
    ovr = overrides(data, 4, **{"data.train": str(shards / "index.json"), "train.checkpoint_every": 0,
                                "data.max_skip_fraction": 1.0})
    out = run(train_cmd(data["root"] / "corrupt_ok", ovr))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(x) for x in (data["root"] / "corrupt_ok" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_samples"] for r in lines if r["split"] == "train"]
    assert counts == sorted(counts) and counts[-1] > 0
    summary = lines[-1]
    assert summary["split"] == "summary" and summary["status"] == "finished"
    assert summary["skipped_samples"] == counts[-1] and list(summary["skipped_by_shard"]) == [str(shards / name)]
    acc = EventAccumulator(str(data["root"] / "corrupt_ok" / "tb"))
    acc.Reload()
    assert acc.Scalars("train/skipped_samples")[-1].value == counts[-1]
    assert f"{int(counts[-1])} corrupt samples skipped" in out.stdout and name in out.stdout

    stop_dir = data["root"] / "corrupt_stop"
    out = run(train_cmd(stop_dir, [*ovr, "data.max_skip_fraction=0.0001"]))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "data.max_skip_fraction=0.0001" in out.stderr and name in out.stderr
    step = json.loads((stop_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"checkpointed at step {step}" in out.stderr and latest(stop_dir) == f"step_{step:07d}"


def test_time_based_checkpoints(data):
    """train.checkpoint_minutes checkpoints when that much time has passed since the last checkpoint, whatever
    train.checkpoint_every says (here: never); 0.0001 minutes is due after every step."""
    run_dir = data["root"] / "timed"
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir),
           *overrides(data, 3, **{"train.checkpoint_every": 0, "train.checkpoint_minutes": 0.0001,
                                  "train.keep_checkpoints": 5})]
    out = run(cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [line.split()[2] for line in out.stdout.splitlines() if line.startswith("checkpoint step")] == ["1", "2", "3"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_000000{i}" for i in (1, 2, 3)]


# ----------------------------------------------------------------------------------------------------
# Unit checks (one process, no DeepSpeed engine)
# ----------------------------------------------------------------------------------------------------


def test_param_groups_and_schedule(data):
    from unimlip_train.config.load import load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.engine.optim import WarmupCosine, build_scheduler, param_groups
    from unimlip_train.losses.objective import UniMlipObjective
    from unimlip_train.models.build import TrainStep, build_model

    cfg = load_config(CONFIG, overrides(data, 100, **{"train.lr_image": 1e-4, "train.lr_text": 2e-5,
                                                      "train.min_lr_ratio": 0.1, "train.warmup_steps": 10}))
    model = build_model(cfg, load_tokenizer(data["tok"]))
    step = TrainStep(model, UniMlipObjective(cfg))
    groups = param_groups(step, model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in step.parameters() if p.requires_grad)
    by_name = {g["name"]: g for g in groups}
    image_ids = {id(p) for p in model.image_tower.parameters()}
    text_ids = {id(p) for p in model.text_tower.parameters()}
    names = {id(p): n for n, p in step.named_parameters()}
    for g in groups:
        for p in g["params"]:
            expected = "image" if id(p) in image_ids else "text" if id(p) in text_ids else \
                "temperature" if p is model.logit_scale else "head"
            assert g["name"].removesuffix("_no_decay") == expected
            no_decay = p.ndim < 2 or "logit_scale" in names[id(p)]
            assert (g["weight_decay"] == 0.0) == no_decay, names[id(p)]
    assert by_name["image"]["lr"] == 1e-4 and by_name["text"]["lr"] == 2e-5
    assert by_name["head"]["lr"] == 2e-3 and by_name["temperature_no_decay"]["params"] == [model.logit_scale]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg)
    fn = WarmupCosine(10, 100, 0.1)
    for k in range(100):
        naive = (k + 1) / 10 if k < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 10) / 90))
        assert fn(k) == pytest.approx(naive) and opt.param_groups[0]["lr"] == pytest.approx(naive)
        opt.step()
        sched.step()


def test_slurm_environment_is_translated(monkeypatch):
    import unimlip_train.distributed.process_group as distributed

    # _export_env writes os.environ; a private copy keeps RANK=5 / WORLD_SIZE=16 from leaking into the
    # processes that later tests start (they would wait forever for 15 peers).
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-004,010],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    distributed._export_env()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "16", "1", "gpu003")
    assert env["MASTER_PORT"] == str(15000 + 123456 % 20000)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    distributed._export_env()  # nothing at all: a one-process group on a free local port
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536
