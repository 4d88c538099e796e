"""Gathered negatives are exact: with W gloo ranks (W = 2 and 3), the mean over ranks of the losses and of
the parameter gradients equals the single-process loss and gradients on the concatenated global batch, with
duplicate identities spread over the ranks (multi-positive InfoNCE, SigLIP, masked NT-Xent); ITM's
hard-negative sampling picks the same global indices and its row exchange moves the right rows and
gradients; K accumulated micro batches per rank give the loss and gradients of one batch of all of them.
One torchrun launch per world size runs every check (tests/dist_loss_worker.py); the single-process
references are computed here. The 2-rank launch also runs the training step under a DeepSpeed ZeRO-3 engine
(parameters partitioned outside forward)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_loss_worker import pair_losses
from unimlip_tiny import random_batch, tiny_config, tiny_tokenizer
from unimlip_train.losses.contrastive import nt_xent, positive_mask, uniformity_loss
from unimlip_train.losses.hard_negatives import sample_hard_negatives
from unimlip_train.losses.objective import UniMlipObjective
from unimlip_train.models.build import TrainStep, build_model

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("dist_loss_worker.py")
GLOBAL = 12  # divisible by 2 and 3
TRAIN_GLOBAL = 12  # divisible by 2 and 3 ranks x 2 accumulated micro batches
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
        "bias": torch.tensor([-2.0], dtype=torch.float64),
        "ids": torch.tensor([0, 1, 2, 0, 3, 4, 5, 2, 6, 0, 7, 8]),  # duplicates within and across ranks
        "x1": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "x2": torch.randn(GLOBAL, d, generator=g, dtype=torch.float64),
        "wn": torch.randn(d, d, generator=g, dtype=torch.float64),
        "temperature": 0.2,
        "sim": torch.randn(GLOBAL, GLOBAL, generator=g) * 3,
        "seed": 123,
        "step": 41,
        "vocab_dir": str(folder),
        "batch": {k: v.double() if v.is_floating_point() else v
                  for k, v in random_batch(TRAIN_GLOBAL, 9, g, reports=3, groups=4, label_sets=2).items()},
        "rows": torch.randn(GLOBAL, 3, 2, generator=g, dtype=torch.float64),
        "wanted": torch.randint(0, GLOBAL, (GLOBAL,), generator=g),
        "row_weights": torch.randn(GLOBAL, 3, 2, generator=g, dtype=torch.float64),
        "k_micro": 2,
    }
    # the losses / sampling on the whole global batch, single process
    ref = {"contrastive": {}}
    for name in ("infonce", "infonce_plain", "sigmoid"):
        wa, wb, log_scale, bias = (inp[k].clone().requires_grad_() for k in ("wa", "wb", "log_scale", "bias"))
        loss = pair_losses(F.normalize(inp["x"] @ wa, dim=-1), F.normalize(inp["y"] @ wb, dim=-1), log_scale, bias,
                           inp["ids"])[name]
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in (wa, wb, log_scale, bias)]
        ref["contrastive"][name] = {"loss": loss.detach(), "grads": grads}
    w = inp["wn"].clone().requires_grad_()
    loss = nt_xent(F.normalize(inp["x1"] @ w, dim=-1), F.normalize(inp["x2"] @ w, dim=-1), inp["temperature"],
                   inp["ids"])
    loss.backward()
    ref["nt_xent"] = {"loss": loss.detach(), "grads": [w.grad]}
    w = inp["wn"].clone().requires_grad_()
    loss = nt_xent(F.normalize(inp["x1"] @ w, dim=-1), F.normalize(inp["x2"] @ w, dim=-1), inp["temperature"],
                   inp["ids"], center=True)
    loss.backward()
    ref["nt_xent_center"] = {"loss": loss.detach(), "grads": [w.grad]}
    w = inp["wn"].clone().requires_grad_()
    loss = uniformity_loss(F.normalize(inp["x1"] @ w, dim=-1), inp["ids"])
    loss.backward()
    ref["uniformity"] = {"loss": loss.detach(), "grads": [w.grad]}
    picked, valid = sample_hard_negatives(inp["sim"], positive_mask(inp["ids"], GLOBAL, torch.device("cpu")), 0,
                                          inp["seed"], inp["step"], stream=0)
    ref["sampled"] = torch.where(valid, picked, -1)
    rows = inp["rows"].clone().requires_grad_()
    (rows[inp["wanted"]] * inp["row_weights"]).sum().backward()
    ref["exchange"] = {"rows": inp["rows"][inp["wanted"]], "grads": rows.grad}
    # the whole training step: tiny model, every term on, dropout off so the forward is deterministic
    cfg = tiny_config(dropout=0.0)
    cfg.loss.positives = "report+group"
    inp["cfg"], inp["state_dict"], ref["train_step"] = reference_step(cfg, folder, inp)
    # the issue-21 options that must not depend on the split either (ITM's sampled pairs, one negative per
    # pair, MLM on the augmented report, centred text NT-Xent, the uniformity term, two image-token groups,
    # label positives in the text pair)
    cfg = tiny_config(dropout=0.0, uniformity=0.3)
    cfg.loss.positives, cfg.loss.itm_negatives, cfg.loss.itm_fraction = "report+group", "one_per_pair", 0.5
    cfg.loss.text_positives = "labels"
    cfg.loss.mlm_view, cfg.loss.itm_hardness = "augmented", 0.5
    cfg.model.fusion.image_stages = 2  # image tokens as two groups: both move between ranks for ITM
    cfg.loss.text_ssl.center = cfg.loss.text_feature.center = True
    inp["cfg_opts"], inp["state_dict_opts"], ref["train_step_opts"] = reference_step(cfg, folder, inp)
    # the replay checks (in the worker): every term, the text encoder's dropout, and the image perturbation of
    # each tower kind: spatial dropout in a BatchNorm ResNet, patch dropout (token drop) in a ViT
    for key in ("replay_resnet", "replay_vit"):
        cfg = tiny_config(dropout=0.1, uniformity=0.3)
        if key == "replay_resnet":
            cfg.model.image.name, cfg.model.image.kwargs, cfg.model.image.spatial_drop = "resnet10t", {}, 0.3
        else:
            cfg.model.image.token_drop = 0.5
        torch.manual_seed(0)
        replay_model = build_model(cfg, tiny_tokenizer(folder)).double()
        inp[key] = {"cfg": cfg.to_dict(), "state_dict": {k: v.clone() for k, v in replay_model.state_dict().items()}}
    # accumulation references: one batch of everything, contrastive terms only (infonce; sigmoid ITC)
    off = {"mlm": 0.0, "itm": 0.0}
    for key, cfg in (("acc_infonce", tiny_config(dropout=0.0, **off)),  # with label positives in the text pair
                     ("acc_sigmoid", tiny_config(dropout=0.0, **off, image_ssl=0.0, image_feature=0.0, text_ssl=0.0,
                                                 text_feature=0.0))):
        cfg.loss.itc.kind = "sigmoid" if key == "acc_sigmoid" else "infonce"
        cfg.loss.text_positives = "labels" if key == "acc_infonce" else "identity"
        cfg_dict, state, ref[key] = reference_step(cfg, folder, inp)
        inp[key] = {"cfg": cfg_dict, "state_dict": state}
    torch.save(inp, folder / "in.pt")
    return folder, ref


def reference_step(cfg, folder, inp) -> tuple:
    """A model for ``cfg`` (seeded), and its single-process training step on the whole global batch."""
    torch.manual_seed(0)
    model = build_model(cfg, tiny_tokenizer(folder)).double()  # fp64: differences are then the method's, not rounding
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, logs = TrainStep(model, UniMlipObjective(cfg)).train()(inp["batch"], inp["step"])
    loss.backward()
    ref = {"loss": loss.detach(), "logs": logs,
           "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return cfg.to_dict(), state, ref


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

    checks = [(f"contrastive/{n}", out["contrastive"][n], ref["contrastive"][n]) for n in ref["contrastive"]]
    checks += [(name, out[name], ref[name]) for name in ("nt_xent", "nt_xent_center", "uniformity")]
    for name, got, want in checks:
        assert rel_err(got["loss"], want["loss"]) < RTOL, name
        for got_grad, want_grad in zip(got["grads"], want["grads"]):
            assert rel_err(got_grad, want_grad) < RTOL or want_grad.norm() == got_grad.norm() == 0, name

    assert torch.equal(out["sampled"], ref["sampled"])
    assert torch.equal(out["exchange"]["rows"], ref["exchange"]["rows"])
    assert rel_err(out["exchange"]["grads"], ref["exchange"]["grads"]) < RTOL

    if world_size == 2:  # the ZeRO-3 engine runs in the 2-rank launch only
        assert rel_err(out["zero3"]["loss"], ref["train_step"]["loss"]) < RTOL
        assert out["zero3"]["logit_scale_shape"] == [1]
        assert out["zero3"]["log_scale_clamped"].item() == pytest.approx(1.0, abs=1e-6)
        assert abs(out["zero3"]["log_scale_after_step"].item() - 1.0) < 2e-3  # one AdamW step of lr 1e-3 away

    for key in ("train_step", "train_step_opts"):
        got, want = out[key], ref[key]
        assert rel_err(got["loss"], want["loss"]) < RTOL
        assert set(got["logs"]) == set(want["logs"]) == {
            "loss", "itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm",
            "itm_dropped_rows", "itm_acc", "temperature", "logit_scale",
            *(("uniformity", "label_alike") if "opts" in key else ()),
        }
        assert "opts" not in key or want["logs"]["label_alike"] > 0  # the label sets do add positives
        for log in want["logs"]:
            assert rel_err(got["logs"][log], want["logs"][log]) < RTOL or got["logs"][log] == want["logs"][log], log
        assert set(got["grads"]) == set(want["grads"])
        assert_grads_match(got["grads"], want["grads"])

    # the cache + replay with all noise (and BatchNorm) on equals one loss over the step (no cache), exactly
    for key, got in out["replay"].items():
        assert got["replay"].item() == 0.0, key  # the recomputed embeddings are the cached ones, bit for bit
        assert set(got["counters"]) == ({2} if key == "replay_resnet" else set())  # one BatchNorm update per micro batch
        assert set(got["grads"]) == set(got["reference"]), key
        assert_grads_match(got["grads"], got["reference"])

    for key in ("acc_infonce", "acc_sigmoid"):  # K = 2 accumulated micro batches per rank vs one global batch
        got, want = out["accumulated"][key], ref[key]
        assert rel_err(got["loss"], want["loss"]) < RTOL, key
        assert set(got["grads"]) == set(want["grads"]), key
        assert_grads_match(got["grads"], want["grads"])


def assert_grads_match(got: dict, want: dict) -> None:
    # a few gradients are mathematically zero (attention key biases) and hold only rounding noise: measure
    # every error against at least a thousandth of the whole gradient's norm
    floor = 1e-3 * torch.cat([g.flatten() for g in want.values()]).norm()
    for name, grad in want.items():
        err = (got[name] - grad).norm()
        assert err < RTOL * max(grad.norm(), floor), (name, float(err), float(grad.norm()))
