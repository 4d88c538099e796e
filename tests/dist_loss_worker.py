"""One torchrun worker for test_losses_distributed: every gathered-negative invariant in one launch.

Usage: torchrun --standalone --nproc_per_node W tests/dist_loss_worker.py IN.pt OUT.pt
IN.pt (written by the test) holds the global inputs; each rank takes its rows, computes its local loss
and gradients, and the ranks average them as DeepSpeed does. Rank 0 writes those averages to OUT.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import BertTokenizer

import unimlip_train.losses.gather as gather
from unimlip_train.config.load import _build
from unimlip_train.config.schema import Config
from unimlip_train.losses.contrastive import contrastive_loss, nt_xent, positive_mask, sigmoid_loss, uniformity_loss
from unimlip_train.losses.hard_negatives import sample_hard_negatives
from unimlip_train.losses.objective import AccumulationCache, UniMlipObjective
from unimlip_train.models.build import TrainStep, build_model
from unimlip_train.models.norm_stats import frozen_running_stats


def config_from_dict(data: dict) -> Config:
    """The test's config as written, without the user-facing validation: equality checks need towers without
    any random perturbation, which a training config must not have with feature-level terms on."""
    return _build(Config, data, "", None, "test")


def read_tokenizer(inp: dict) -> BertTokenizer:
    """The tiny tokenizer from the vocab.txt the test wrote (read only: ranks must not rewrite it)."""
    return BertTokenizer(vocab=str(Path(inp["vocab_dir"]) / "vocab.txt"))


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def local_rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = t.shape[0] // world_size
    return t[rank * n:(rank + 1) * n]


def pair_losses(a, b, log_scale, bias, ids) -> dict:
    """The image-text losses under test, as (name -> loss); the single-process reference calls the same."""
    return {"infonce": contrastive_loss(a, b, log_scale.exp(), ids), "infonce_plain": contrastive_loss(a, b, log_scale.exp()),
            "sigmoid": sigmoid_loss(a, b, log_scale.exp(), bias, ids)}


def contrastive_check(inp: dict, rank: int, world_size: int) -> dict:
    out = {}
    for name in pair_losses(*(inp[k] for k in ("x", "y", "log_scale", "bias")), inp["ids"]):
        wa, wb, log_scale, bias = (inp[k].clone().requires_grad_() for k in ("wa", "wb", "log_scale", "bias"))
        a = F.normalize(local_rows(inp["x"], rank, world_size) @ wa, dim=-1)
        b = F.normalize(local_rows(inp["y"], rank, world_size) @ wb, dim=-1)
        loss = pair_losses(a, b, log_scale, bias, local_rows(inp["ids"], rank, world_size))[name]
        loss.backward()
        grads = [mean_over_ranks(p.grad if p.grad is not None else torch.zeros_like(p)) for p in (wa, wb, log_scale, bias)]
        out[name] = {"loss": mean_over_ranks(loss), "grads": grads}
    return out


def nt_xent_check(inp: dict, rank: int, world_size: int, center: bool = False) -> dict:
    w = inp["wn"].clone().requires_grad_()
    z1 = F.normalize(local_rows(inp["x1"], rank, world_size) @ w, dim=-1)
    z2 = F.normalize(local_rows(inp["x2"], rank, world_size) @ w, dim=-1)
    loss = nt_xent(z1, z2, inp["temperature"], local_rows(inp["ids"], rank, world_size), center=center)
    loss.backward()
    return {"loss": mean_over_ranks(loss), "grads": [mean_over_ranks(w.grad)]}


def uniformity_check(inp: dict, rank: int, world_size: int) -> dict:
    w = inp["wn"].clone().requires_grad_()
    loss = uniformity_loss(F.normalize(local_rows(inp["x1"], rank, world_size) @ w, dim=-1),
                           local_rows(inp["ids"], rank, world_size))
    loss.backward()
    return {"loss": mean_over_ranks(loss), "grads": [mean_over_ranks(w.grad)]}


def sampling_check(inp: dict, rank: int, world_size: int) -> torch.Tensor:
    logits = local_rows(inp["sim"], rank, world_size)
    n = logits.shape[0]
    excluded = positive_mask(local_rows(inp["ids"], rank, world_size), n, logits.device)
    picked, valid = sample_hard_negatives(logits, excluded, rank * n, inp["seed"], inp["step"], stream=0)
    return gather.all_gather_no_grad(torch.where(valid, picked, -1))


def exchange_check(inp: dict, rank: int, world_size: int) -> dict:
    """exchange_rows returns the wanted global rows and sends their gradients back to the owning ranks."""
    rows = local_rows(inp["rows"], rank, world_size).clone().requires_grad_()
    wanted = local_rows(inp["wanted"], rank, world_size)
    got = gather.exchange_rows(rows, wanted)
    (got * local_rows(inp["row_weights"], rank, world_size)).sum().backward()
    return {"rows": gather.all_gather_no_grad(got.detach()), "grads": gather.all_gather_no_grad(rows.grad)}


def train_step_check(inp: dict, rank: int, world_size: int, key: str = "") -> dict:
    cfg = config_from_dict(inp["cfg" + key])
    model = build_model(cfg, read_tokenizer(inp)).double()
    model.load_state_dict(inp["state_dict" + key])
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    batch = {k: local_rows(v, rank, world_size) for k, v in inp["batch"].items()}
    loss, logs = step(batch, inp["step"])
    loss.backward()
    return {
        "loss": mean_over_ranks(loss),
        "logs": {k: mean_over_ranks(v) for k, v in logs.items()},
        "grads": {name: mean_over_ranks(p.grad) for name, p in model.named_parameters()},
    }


def accumulation_check(inp: dict, rank: int, world_size: int, key: str) -> dict:
    """K micro batches per rank with accumulated negatives, as the trainer runs them: a no-grad pass caches
    every micro batch's embeddings, then each is recomputed with gradients and its loss divided by K (the
    engine's accumulation). The summed gradients must be those of one loss over every rank's K micro batches."""
    cfg = config_from_dict(inp[key]["cfg"])
    model = build_model(cfg, read_tokenizer(inp)).double()
    model.load_state_dict(inp[key]["state_dict"])
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    local = {k: local_rows(v, rank, world_size) for k, v in inp["batch"].items()}
    k_micro = inp["k_micro"]
    micro = [{k: local_rows(v, i, k_micro) for k, v in local.items()} for i in range(k_micro)]
    with torch.no_grad():
        entries = [step(b, inp["step"], embed_only=True) for b in micro]
    for i, b in enumerate(micro):
        loss, logs = step(b, inp["step"], cache=AccumulationCache(entries, i))
        (loss / k_micro).backward()
    return {"loss": mean_over_ranks(logs["loss"]),
            "grads": {name: mean_over_ranks(p.grad) for name, p in model.named_parameters() if p.grad is not None}}


def replay_check(inp: dict, rank: int, world_size: int, key: str) -> dict:
    """The trainer's accumulation scheme with every term on, dropout, spatial dropout and a BatchNorm tower:
    a no-grad caching pass of the K micro batches (random state saved before each, running statistics left
    alone), then each micro batch recomputed from its saved state with the cache (loss / K, as the engine
    accumulates). Reference, computed here without any cache: the K micro batches forwarded with gradients
    from the same states, then ONE loss over the whole step (contrastive terms over the concatenation of every
    rank's K micro batches, MLM and ITM per micro batch / K). Both gradients are averaged over ranks."""
    cfg = config_from_dict(inp[key]["cfg"])
    k_micro, step_no = inp["k_micro"], inp["step"]
    local = {k: local_rows(v, rank, world_size) for k, v in inp["batch"].items()}
    micro = [{k: local_rows(v, i, k_micro) for k, v in local.items()} for i in range(k_micro)]

    def fresh():
        model = build_model(cfg, read_tokenizer(inp)).double()
        model.load_state_dict(inp[key]["state_dict"])
        return model.train()

    torch.manual_seed(1000 + rank)
    model = fresh()
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    states, entries, replay = [], [], []
    with torch.no_grad(), frozen_running_stats(model):
        for b in micro:
            states.append(torch.get_rng_state())
            entries.append(step(b, step_no, embed_only=True))
    for i, b in enumerate(micro):
        torch.set_rng_state(states[i])
        loss, logs = step(b, step_no * k_micro + i, cache=AccumulationCache(entries, i))
        (loss / k_micro).backward()
        replay.append(logs["accum_replay_max_abs"])

    reference, objective = fresh(), UniMlipObjective(cfg)
    outs = []
    for i, b in enumerate(micro):
        torch.set_rng_state(states[i])
        outs.append(reference(b))
    whole = {**outs[0], **{k: torch.cat([o[k] for o in outs]) for k in objective.cached_keys}}
    ids = torch.cat([b["report_id"] for b in micro]) if cfg.loss.positives == "report" else None
    total = 0.0
    for name, term in objective.terms.items():
        weight = objective.weights[name]
        if term.contrastive:
            total = total + weight * term(None, whole, reference, step_no, ids)
        else:
            for i, b in enumerate(micro):
                value = term(b, outs[i], reference, step_no * k_micro + i, b["report_id"])
                total = total + weight * (value[name] if isinstance(value, dict) else value) / k_micro
    total.backward()
    grads = lambda m: {n: mean_over_ranks(p.grad) for n, p in m.named_parameters() if p.grad is not None}  # noqa: E731
    counters = [int(b) for n, b in model.image_tower.named_buffers() if n.endswith("num_batches_tracked")]
    return {"grads": grads(model), "reference": grads(reference), "replay": torch.stack(replay).max(),
            "counters": counters}


def zero3_check(inp: dict, rank: int, world_size: int) -> dict:
    """The same training step wrapped by a DeepSpeed ZeRO-3 engine: parameters are partitioned outside
    forward, so this proves the model and every term read them only inside ``TrainStep.forward``."""
    import deepspeed

    cfg = config_from_dict(inp["cfg"])
    model = build_model(cfg, read_tokenizer(inp))
    model.load_state_dict(inp["state_dict"])
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    n = inp["batch"]["image"].shape[0] // world_size
    engine, *_ = deepspeed.initialize(
        model=step, optimizer=torch.optim.AdamW(step.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": n, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 3}, "steps_per_print": 10**9},
    )
    batch = {k: local_rows(v.float() if v.is_floating_point() else v, rank, world_size) for k, v in inp["batch"].items()}
    loss, logs = engine(batch, inp["step"])
    engine.backward(loss)
    engine.step()
    # The in-place temperature clamp reaches ZeRO-3's partitioned master weights: after one more optimizer
    # step the value is still next to the bound (an unclamped master would have put it back near ln(1/0.07)).
    from unimlip_train.engine.optim import clamp_parameter_

    clamp_parameter_(model.logit_scale, 0.0, 1.0)
    clamped = engine(batch, inp["step"])[1]["logit_scale"]
    engine.backward(engine(batch, inp["step"])[0])
    engine.step()
    after = engine(batch, inp["step"])[1]["logit_scale"]
    return {"loss": mean_over_ranks(loss), "logit_scale_shape": list(model.logit_scale.ds_shape),
            "log_scale_clamped": clamped.log(), "log_scale_after_step": after.log()}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inp = torch.load(sys.argv[1], weights_only=True)
    out = {
        "world_size": world_size,
        "contrastive": contrastive_check(inp, rank, world_size),
        "nt_xent": nt_xent_check(inp, rank, world_size),
        "nt_xent_center": nt_xent_check(inp, rank, world_size, center=True),
        "uniformity": uniformity_check(inp, rank, world_size),
        "train_step_opts": train_step_check(inp, rank, world_size, "_opts"),
        "replay": {key: replay_check(inp, rank, world_size, key) for key in ("replay_resnet", "replay_vit")},
        "sampled": sampling_check(inp, rank, world_size),
        "exchange": exchange_check(inp, rank, world_size),
        "train_step": train_step_check(inp, rank, world_size),
        "accumulated": {key: accumulation_check(inp, rank, world_size, key) for key in ("acc_infonce", "acc_sigmoid")},
    }
    if world_size == 2:  # once is enough: DeepSpeed's import and setup cost more than all other checks
        out["zero3"] = zero3_check(inp, rank, world_size)
    if rank == 0:
        torch.save(out, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
