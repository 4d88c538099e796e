"""The training engine on CPU with 2 gloo processes: ZeRO 1/2/3 learn, exact resume after kill -9, a kill
while a checkpoint is written, TensorBoard read-back, export round trip, world-size change; plus unit checks
of the optimizer groups, the schedule and the SLURM environment translation.

Real shards (``unimlip-shard synthetic``), a real tokenizer (``unimlip-shard tokenizer``), real torchrun.
Launches are grouped and shared through module fixtures; the whole file takes about 2-4 minutes.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

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
    shards, tok = root / "shards", root / "tok"
    common = dict(check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "170", "--image-size", "32",
                    "--max-size", "32", "--val-fraction", "0.1", "--shard-size", "30", "--out", str(shards),
                    "--workers", "1", "--no-progress"], **common)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "tokenizer", "--data", str(shards), "--out", str(tok)],
                   **common)
    train_samples = json.loads((shards / "index.json").read_text())["splits"]["train"]["samples"]
    # Naive reference of the epoch length: the train split cut into 2 ranks x 1 worker, whole micro batches.
    steps_per_epoch = (train_samples // 2) // MB
    return {"index": str(shards / "index.json"), "tok": str(tok), "root": root, "steps_per_epoch": steps_per_epoch}


def overrides(data, steps, **extra) -> list:
    base = {
        "data.train": data["index"], "data.val": data["index"], "model.tokenizer": data["tok"],
        "data.image_size": 32, "data.num_workers": 1, "data.shuffle_buffer": 32, "data.text.max_length": 32,
        "model.image.name": "vit_tiny_patch16_224",
        "model.image.kwargs": "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2.0}",
        "model.text.config": "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                             "intermediate_size: 64, max_position_embeddings: 64}",
        "model.embed_dim": 32, "model.ssl_embed_dim": 32, "model.fusion": "{layers: 1, heads: 2}",
        "train.micro_batch_size": MB, "train.steps": steps, "train.warmup_steps": 2, "train.log_every": 1,
        "train.checkpoint_every": 4, "train.keep_checkpoints": 2, "train.lr": 2e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


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
        # kill -9 of the whole job: torchrun, both ranks (torchrun puts them in their own sessions), loader workers
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in job:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(job, timeout=60)
        proc.wait(timeout=60)
    log_text = (data["root"] / "interrupted.log").read_text()
    assert "finished at step" not in log_text, log_text[-3000:]
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
    from unimlip_train.engine.checkpoint import export, load_for_eval

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
    from unimlip_train.data.loader import build_eval_loader
    from unimlip_train.engine.checkpoint import consolidated_state_dict, load_for_eval, resolve_checkpoint

    # ZeRO-1: DeepSpeed's module file holds the full fp32 weights; zero_to_fp32 must agree with it exactly.
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


def test_world_size_change_resumes_weights_with_a_clear_message(data, reference):
    steps = reference["steps"] + 2
    run_dir = data["root"] / "one_rank"
    tag = reference["dir"] / "checkpoints" / f"step_{reference['steps']:07d}"
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG, "--run-dir", str(run_dir),
           "--resume", str(tag), *overrides(data, steps)]
    out = run(cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "layout changed (2 -> 1 ranks" in out.stdout and "restarts at the beginning of epoch" in out.stdout
    assert str(tag) in out.stdout
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
    With ``train.negatives=micro`` the terms see fewer negatives, so the loss differs."""
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

    # bf16 with fp32 gradient accumulation puts ZeRO-1 on DeepSpeed's BF16_Optimizer, whose checkpoints its own
    # consolidation refuses: ours reads the fp32 master, which rounds to exactly the bf16 weights trained with.
    from unimlip_train.engine.checkpoint import _module_states, consolidated_state_dict, resolve_checkpoint

    tag = resolve_checkpoint(str(data["root"] / "acc_bf16"))
    assert (Path(tag) / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    master, module = consolidated_state_dict(tag), _module_states(tag)
    assert master.keys() == {k[len("model."):] for k in module if k.startswith("model.")}
    assert all(v.dtype == torch.float32 for v in master.values() if v.is_floating_point())
    assert all(torch.equal(v.bfloat16(), module["model." + k].bfloat16()) for k, v in master.items())
    assert any(not torch.equal(v, module["model." + k]) for k, v in master.items())  # more than the bf16 copy


# ----------------------------------------------------------------------------------------------------
# Unit checks (one process, no DeepSpeed engine)
# ----------------------------------------------------------------------------------------------------


def test_param_groups_and_schedule(data):
    from unimlip_train.config import load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.engine.optim import WarmupCosine, build_scheduler, param_groups
    from unimlip_train.losses import UniMlipObjective
    from unimlip_train.models import TrainStep, build_model

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
    from unimlip_train import distributed

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
