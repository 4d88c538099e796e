"""Gathered negatives are exact: with W gloo ranks (W = 2 and 3), the mean over ranks of the losses and of
the parameter gradients equals the single-process loss and gradients on the concatenated global batch, and
ITM's hard-negative sampling picks the same global indices. One torchrun launch per world size runs every
check (tests/dist_loss_worker.py); the single-process references are computed here. The 2-rank launch also
runs the training step under a DeepSpeed ZeRO-3 engine (parameters partitioned outside forward)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unimlip_tiny import random_batch, tiny_config, tiny_tokenizer
from unimlip_train.losses import UniMlipObjective, contrastive_loss, nt_xent, sample_hard_negatives
from unimlip_train.models import TrainStep, build_model

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("dist_loss_worker.py")
GLOBAL = 12  # divisible by 2 and 3
TRAIN_GLOBAL = 6
RTOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Global inputs (saved for the workers) and their single-process losses / gradients."""
    folder = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(7)
    d = 16
    inp = {
        "x": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "y": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "wa": torch.randn(d, d, generator=g, dtype=torch.float64),
        "wb": torch.randn(d, d, generator=g, dtype=torch.float64),
        "log_scale": torch.tensor([1.5], dtype=torch.float64),
        "x1": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "x2": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "wn": torch.randn(d, d, generator=g, dtype=torch.float64),
        "temperature": 0.2,
        "sim": torch.randn(GLOBAL, GLOBAL, generator=g) * 3,
        "seed": 123,
        "step": 41,
        "vocab_dir": str(folder),
        "batch": random_batch(TRAIN_GLOBAL, 9, g),
    }
    # contrastive_loss / nt_xent / sampling on the whole global batch, single process
    wa, wb, log_scale = (inp[k].clone().requires_grad_() for k in ("wa", "wb", "log_scale"))
    loss = contrastive_loss(F.normalize(inp["x"] @ wa, dim=-1), F.normalize(inp["y"] @ wb, dim=-1), log_scale.exp())
    loss.backward()
    ref = {"contrastive": {"loss": loss.detach(), "grads": [wa.grad, wb.grad, log_scale.grad]}}
    w = inp["wn"].clone().requires_grad_()
    loss = nt_xent(F.normalize(inp["x1"] @ w, dim=-1), F.normalize(inp["x2"] @ w, dim=-1), inp["temperature"])
    loss.backward()
    ref["nt_xent"] = {"loss": loss.detach(), "grads": [w.grad]}
    ref["sampled"] = sample_hard_negatives(inp["sim"], 0, inp["seed"], inp["step"], stream=0)
    # the whole training step: tiny model, every term on, dropout off so the forward is deterministic
    cfg = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, tiny_tokenizer(folder))
    inp["cfg"], inp["state_dict"] = cfg.to_dict(), model.state_dict()
    loss, logs = TrainStep(model, UniMlipObjective(cfg)).train()(inp["batch"], inp["step"])
    loss.backward()
    ref["train_step"] = {
        "loss": loss.detach(), "logs": logs, "grads": {n: p.grad for n, p in model.named_parameters()},
    }
    torch.save(inp, folder / "in.pt")
    return folder, ref


@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_equals_single_process(case, world_size):
    folder, ref = case
    out_file = folder / f"out{world_size}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
           str(WORKER), str(folder / "in.pt"), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = torch.load(out_file, weights_only=True)
    assert out["world_size"] == world_size

    for name in ("contrastive", "nt_xent"):
        want = ref[name]
        assert rel_err(out[name]["loss"], want["loss"]) < RTOL, name
        for got_grad, want_grad in zip(out[name]["grads"], want["grads"]):
            assert rel_err(got_grad, want_grad) < RTOL, name

    assert torch.equal(out["sampled"], ref["sampled"])

    if world_size == 2:  # the ZeRO-3 engine runs in the 2-rank launch only
        assert rel_err(out["zero3"]["loss"], ref["train_step"]["loss"]) < RTOL
        assert out["zero3"]["logit_scale_shape"] == [1]

    got, want = out["train_step"], ref["train_step"]
    assert rel_err(got["loss"], want["loss"]) < RTOL
    assert set(got["logs"]) == set(want["logs"]) == {
        "loss", "itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm",
        "temperature",
    }
    for key in want["logs"]:
        assert rel_err(got["logs"][key], want["logs"][key]) < RTOL, key
    assert set(got["grads"]) == set(want["grads"])
    # a few gradients are mathematically zero (attention key biases) and hold only rounding noise: measure
    # every error against at least a thousandth of the whole gradient's norm
    floor = 1e-3 * torch.cat([g.flatten() for g in want["grads"].values()]).norm()
    for name, grad in want["grads"].items():
        err = (got["grads"][name] - grad).norm()
        assert err < RTOL * max(grad.norm(), floor), (name, float(err), float(grad.norm()))
