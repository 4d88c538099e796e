"""Elastic resume on real torchrun ranks (gloo): a run continues on 3, then 1, then 2 ranks and across ZeRO stages
with its master weights, Adam moments and steps carried bit for bit, every sample of the interrupted epoch
trained on exactly once, a reshard round trip (2 -> 3 -> 2, no step between) resuming bit-identical to the
uninterrupted run, and ``unimlip-checkpoint reshard`` training exactly as the direct load at the new shape.

Four launches (2, 3, 1 and 2 ranks), several trainings each (``elastic_worker.py``); a training that saves "first"
writes a checkpoint right after its resume, before any step: what the engine holds after the reshard.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from unimlip_train.engine.checkpoint import read_for_reshard

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
MB = 8
TIMEOUT = 600

pytestmark = pytest.mark.multiprocess


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNIMLIP_LOG_SAMPLE_KEYS": "1", **extra}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    common = dict(check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "170", "--image-size", "32",
                    "--max-size", "32", "--val-fraction", "0.1", "--shard-size", "30", "--out", str(root / "shards"),
                    "--workers", "1", "--no-progress"], **common)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "tokenizer", "--data", str(root / "shards"), "--out",
                    str(root / "tok")], **common)
    split = json.loads((root / "shards" / "index.json").read_text())["splits"]["train"]
    return {"root": root, "index": str(root / "shards" / "index.json"), "tok": str(root / "tok"),
            "train_samples": split["samples"]}


def _overrides(shards, steps, **extra) -> list:
    """The tests' tiny model without evaluation, a checkpoint every 2 steps, all kept."""
    return tiny_overrides(shards["index"], shards["tok"], steps, MB, **{
        "data.val": "", "train.checkpoint_every": 2, "train.keep_checkpoints": 0, **extra})


def _job(shards, name, steps, resume="none", save_first=False, **extra) -> dict:
    return {"config": CONFIG, "run_dir": str(shards["root"] / name), "resume": resume, "save_first": save_first,
            "overrides": _overrides(shards, steps, **extra)}


def _launch(nproc: int, jobs: list) -> str:
    worker = [str(REPO / "tests" / "elastic_worker.py"), json.dumps(jobs)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    out = subprocess.run(launcher + worker, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _tag(shards, name: str, step: int) -> str:
    return str(shards["root"] / name / "checkpoints" / f"step_{step:07d}")


def _metrics(shards, name: str) -> dict:
    lines = [json.loads(x) for x in (shards["root"] / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == "train"}


def _events(shards, name: str) -> list:
    lines = [json.loads(x) for x in (shards["root"] / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == "event"]


def _keys(shards, name: str) -> list:
    """(step, epoch, keys) of every micro batch of every rank of a run dir."""
    out = []
    for path in sorted((shards["root"] / name / "debug").glob("sample_keys.rank*.jsonl")):
        out += [(r["step"], r["epoch"], r["keys"]) for r in map(json.loads, path.read_text().splitlines())]
    return out


def _same_state(a: str, b: str) -> None:
    """Two tags hold the same weights and optimizer state, bit for bit, whatever layouts wrote them."""
    (wa, oa), (wb, ob) = read_for_reshard(a), read_for_reshard(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa.steps() == ob.steps() and set(oa.steps().values()) == {int(a.rsplit("_", 1)[1])}
    for key in ("master", "exp_avg", "exp_avg_sq"):
        x, y = getattr(oa, key), getattr(ob, key)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), key
    assert any(v.abs().sum() > 0 for v in oa.exp_avg_sq.values())


@pytest.fixture(scope="module")
def two(shards):
    """2 ranks: the uninterrupted reference (ZeRO-1, fp32, 12 steps: one epoch and 3 steps), and 4 steps each
    of ZeRO-3 and of ZeRO-1 in bf16 (DeepSpeed's BF16_Optimizer)."""
    _launch(2, [_job(shards, "ref", 12), _job(shards, "z3", 4, **{"deepspeed.zero_stage": 3}),
                _job(shards, "bf16", 4, **{"deepspeed.precision": "bf16"})])


@pytest.fixture(scope="module")
def three(shards, two):
    """``unimlip-checkpoint reshard`` of the reference at step 4 for 3 ranks; then 3 ranks: the direct resume of
    that step (saved first), the resharded one, ZeRO-3 -> ZeRO-2, and bf16 ZeRO-1 -> ZeRO-3."""
    out = subprocess.run(["unimlip-checkpoint", "reshard", _tag(shards, "ref", 4), "--world-size", "3", "--out",
                          str(shards["root"] / "resharded")], env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    stdout = _launch(3, [_job(shards, "a", 7, _tag(shards, "ref", 4), save_first=True),
                         _job(shards, "cmd", 7, str(shards["root"] / "resharded")),
                         _job(shards, "z3_to_2", 5, _tag(shards, "z3", 4), True, **{"deepspeed.zero_stage": 2}),
                         _job(shards, "bf16_to_3", 5, _tag(shards, "bf16", 4), True,
                              **{"deepspeed.precision": "bf16", "deepspeed.zero_stage": 3})])
    return {"stdout": stdout, "reshard": out.stdout}


@pytest.fixture(scope="module")
def one(shards, three):
    """1 rank, stage 0, from the 3-rank run at step 6 (a second reshard inside the recut epoch), with a global batch
    of 16: grad_accum 2 here."""
    _launch(1, [_job(shards, "one", 11, _tag(shards, "a", 6), True,
                     **{"deepspeed.zero_stage": 0, "train.global_batch_size": 16})])


@pytest.fixture(scope="module")
def back(shards, one):
    """2 ranks again: the round trip (the 3-rank checkpoint saved before any step), ZeRO-1 -> ZeRO-3 from the
    reference, and 1 -> 2 ranks (stage 0 -> ZeRO-2, the same global batch) to the end of the recut epoch 1."""
    _launch(2, [_job(shards, "round_trip", 12, _tag(shards, "a", 4)),
                _job(shards, "z1_to_3", 5, _tag(shards, "ref", 4), True, **{"deepspeed.zero_stage": 3}),
                _job(shards, "one_to_two", 18, _tag(shards, "one", 10), True,
                     **{"deepspeed.zero_stage": 2, "train.global_batch_size": 16})])


def test_moments_master_weights_and_steps_carry_over_bit_for_bit(shards, back):
    _same_state(_tag(shards, "a", 4), _tag(shards, "ref", 4))  # 2 -> 3 ranks
    _same_state(_tag(shards, "one", 6), _tag(shards, "a", 6))  # 3 -> 1 ranks (ZeRO-1 -> stage 0)
    _same_state(_tag(shards, "one_to_two", 10), _tag(shards, "one", 10))  # 1 -> 2 ranks (stage 0 -> ZeRO-2)
    _same_state(_tag(shards, "z1_to_3", 4), _tag(shards, "ref", 4))  # ZeRO-1 -> ZeRO-3
    _same_state(_tag(shards, "z3_to_2", 4), _tag(shards, "z3", 4))  # ZeRO-3 -> ZeRO-2 (and 2 -> 3 ranks)
    _same_state(_tag(shards, "bf16_to_3", 4), _tag(shards, "bf16", 4))  # bf16: BF16_Optimizer -> ZeRO-3
    bf16 = load_file(str(shards["root"] / "resharded" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in bf16.values())


def test_a_reshard_round_trip_resumes_bit_identical(shards, back):
    ref, got = _metrics(shards, "ref"), _metrics(shards, "round_trip")
    assert sorted(got) == list(range(5, 13))
    for step in got:
        for key in ("loss", "itc", "mlm", "itm", "grad_norm", "temperature"):
            assert got[step][key] == ref[step][key], (step, key)
    assert sorted(k for k in _keys(shards, "round_trip")) == sorted(k for k in _keys(shards, "ref") if k[0] > 4)


def test_the_resharded_checkpoint_trains_as_the_direct_load(shards, three):
    direct, resharded = _metrics(shards, "a"), _metrics(shards, "cmd")
    assert sorted(direct) == sorted(resharded) == [5, 6, 7]
    for step in direct:
        assert {k: direct[step][k] for k in ("loss", "grad_norm", "lr/head")} == \
            {k: resharded[step][k] for k in ("loss", "grad_norm", "lr/head")}, step
    assert sorted(_keys(shards, "a")) == sorted(_keys(shards, "cmd"))
    _same_state(_tag(shards, "a", 7), _tag(shards, "cmd", 7))
    assert f"for 3 ranks, ZeRO 1; resume with: unimlip-train --resume {shards['root'] / 'resharded'}" in \
        three["reshard"]


def _train_keys(shards) -> set:
    """The train split's keys, read from its shards (the independent count)."""
    import webdataset as wds

    from unimlip_train.data.shards import iter_raw_samples

    split = json.loads(Path(shards["index"]).read_text())["splits"]["train"]
    root = Path(shards["index"]).parent
    return {r["__key__"] for s in split["shards"] for r in iter_raw_samples(str(root / s["name"]), wds.reraise_exception)}


def test_every_sample_of_the_interrupted_epochs_once(shards, back):
    """Epoch 0 on 2, then 3, then 1 rank; epoch 1 on 1, then 2 ranks: against the train split's own keys."""
    train = _train_keys(shards)
    assert len(train) == shards["train_samples"]
    chain = (("ref", 1, 4), ("a", 5, 6), ("one", 7, 10), ("one_to_two", 11, 18))
    for epoch, last_units in ((0, 1), (1, 2)):
        seen = [k for name, lo, hi in chain for step, e, keys in _keys(shards, name) if lo <= step <= hi and e == epoch
                for k in keys]
        assert len(seen) == len(set(seen)), epoch  # no sample twice
        assert set(seen) <= train
        assert len(train - set(seen)) < last_units * MB + last_units, epoch  # the documented remainder only


def test_one_line_says_what_the_reshard_did(shards, three, back):
    consumed = 4 * 2 * MB  # the reference's first 4 steps on 2 ranks, nothing corrupt
    line = (f"at step 4: from 2 ranks / ZeRO 1 to 3 ranks / ZeRO 1, optimizer moments kept, "
            f"{shards['train_samples'] - consumed} samples of epoch 0 remaining, spread over 3 × 1 loader units")
    assert line in three["stdout"]
    (event,) = _events(shards, "a")
    assert {k: event[k] for k in ("step", "from_ranks", "to_ranks", "from_zero_stage", "to_zero_stage", "epoch",
                                  "remaining_samples", "loader_units", "moments_kept")} == \
        {"step": 4, "from_ranks": 2, "to_ranks": 3, "from_zero_stage": 1, "to_zero_stage": 1, "epoch": 0,
         "remaining_samples": shards["train_samples"] - consumed, "loader_units": 3, "moments_kept": True}
    (event,) = _events(shards, "one_to_two")
    assert (event["from_ranks"], event["to_ranks"], event["from_zero_stage"], event["to_zero_stage"]) == (1, 2, 0, 2)


def test_the_global_batch_is_kept_across_world_sizes(shards, back):
    import yaml

    for name, accum in (("one", 2), ("one_to_two", 1)):
        cfg = yaml.safe_load((shards["root"] / name / "config.yaml").read_text())
        assert (cfg["train"]["global_batch_size"], cfg["train"]["grad_accum"]) == (16, accum)
    a6 = json.loads(Path(_tag(shards, "a", 6), "trainer_state.json").read_text())["samples_seen"]
    one10 = json.loads(Path(_tag(shards, "one", 10), "trainer_state.json").read_text())["samples_seen"]
    end = json.loads(Path(_tag(shards, "one_to_two", 18), "trainer_state.json").read_text())["samples_seen"]
    assert (one10 - a6, end - one10) == (4 * 16, 8 * 16)


def test_inspect_and_export_the_optimizer(shards, three, tmp_path):
    out = subprocess.run(["unimlip-checkpoint", "inspect", str(shards["root"] / "resharded")], env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.splitlines()[-1])
    assert {k: record[k] for k in ("step", "world_size", "zero_stage", "samples_seen", "epoch", "intact")} == \
        {"step": 4, "world_size": 3, "zero_stage": 1, "samples_seen": 4 * 2 * MB, "epoch": 0, "intact": True}
    assert record["resharded_from"]["world_size"] == 2

    out = subprocess.run(["unimlip-export", _tag(shards, "z3", 4), "--optimizer", "--out", str(tmp_path / "x")],
                         env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    weights, state = read_for_reshard(_tag(shards, "z3", 4))
    model, moments = load_file(str(tmp_path / "x" / "model.safetensors")), load_file(str(tmp_path / "x" /
                                                                                           "optimizer.safetensors"))
    trainable = [n for g in state.groups for n in g["params"]]
    assert set(moments) == {f"{n}.{k}" for n in trainable for k in ("exp_avg", "exp_avg_sq")} and set(trainable) <= set(model)
    assert all(torch.equal(moments[f"{n}.exp_avg"], state.exp_avg[n]) and moments[f"{n}.exp_avg"].dtype == torch.float32
               for n in trainable)
    groups = json.loads((tmp_path / "x" / "optimizer.json").read_text())["groups"]
    assert [(g["step"], g["betas"], g["lr"] > 0) for g in groups] == [(4, [0.9, 0.98], True)] * len(groups)

    ref4 = tmp_path / "ref4"  # a rank's state file emptied: inspect says so and exits 1
    shutil.copytree(_tag(shards, "ref", 4), ref4)
    (ref4 / "trainer_rank00001.pt").write_bytes(b"")
    out = subprocess.run(["unimlip-checkpoint", "inspect", str(ref4)], env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 1 and json.loads(out.stdout.splitlines()[-1])["intact"] is False


def test_a_global_batch_that_does_not_divide_is_a_config_error_before_any_process():
    out = subprocess.run([sys.executable, "-m", "unimlip_train.cli.train", "--config", CONFIG,
                          "train.global_batch_size=40", "train.micro_batch_size=8"],
                         env=_env(WORLD_SIZE="3", RANK="0"), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "global batch 40 is not a multiple of micro batch 8 x 3 ranks" in out.stderr
    assert "train.global_batch_size" in out.stderr and out.stderr.count("\n") == 1


def test_global_batch_size_derives_grad_accum(monkeypatch):
    from unimlip_train.config.load import load_config
    from unimlip_train.config.origins import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(CONFIG, ["train.global_batch_size=256", "train.micro_batch_size=16", "train.grad_accum=7"])
    assert cfg.train.grad_accum == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    again = load_config(CONFIG, ["train.global_batch_size=256", "train.micro_batch_size=16"])
    assert again.train.grad_accum == 8 and again.hash() == cfg.hash()  # the same experiment at another size
    assert load_config(CONFIG, ["train.grad_accum=3"]).train.grad_accum == 3  # 0: as before
    with pytest.raises(ConfigError, match="command line: key 'train.global_batch_size': global batch 100"):
        load_config(CONFIG, ["train.global_batch_size=100", "train.micro_batch_size=16"])
