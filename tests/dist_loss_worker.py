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

from unimlip_train.config import config_from_dict
from unimlip_train.losses import UniMlipObjective, contrastive_loss, nt_xent, sample_hard_negatives
from unimlip_train.losses import gather
from unimlip_train.models import TrainStep, build_model


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


def contrastive_check(inp: dict, rank: int, world_size: int) -> dict:
    wa, wb, log_scale = (inp[k].clone().requires_grad_() for k in ("wa", "wb", "log_scale"))
    a = F.normalize(local_rows(inp["x"], rank, world_size) @ wa, dim=-1)
    b = F.normalize(local_rows(inp["y"], rank, world_size) @ wb, dim=-1)
    loss = contrastive_loss(a, b, log_scale.exp())
    loss.backward()
    return {"loss": mean_over_ranks(loss), "grads": [mean_over_ranks(p.grad) for p in (wa, wb, log_scale)]}


def nt_xent_check(inp: dict, rank: int, world_size: int) -> dict:
    w = inp["wn"].clone().requires_grad_()
    z1 = F.normalize(local_rows(inp["x1"], rank, world_size) @ w, dim=-1)
    z2 = F.normalize(local_rows(inp["x2"], rank, world_size) @ w, dim=-1)
    loss = nt_xent(z1, z2, inp["temperature"])
    loss.backward()
    return {"loss": mean_over_ranks(loss), "grads": [mean_over_ranks(w.grad)]}


def sampling_check(inp: dict, rank: int, world_size: int) -> torch.Tensor:
    logits = local_rows(inp["sim"], rank, world_size)
    n = logits.shape[0]
    picked = sample_hard_negatives(logits, rank * n, inp["seed"], inp["step"], stream=0)
    return gather.all_gather_no_grad(picked)


def train_step_check(inp: dict, rank: int, world_size: int) -> dict:
    cfg = config_from_dict(inp["cfg"])
    model = build_model(cfg, read_tokenizer(inp))
    model.load_state_dict(inp["state_dict"])
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    batch = {k: local_rows(v, rank, world_size) for k, v in inp["batch"].items()}
    loss, logs = step(batch, inp["step"])
    loss.backward()
    return {
        "loss": mean_over_ranks(loss),
        "logs": {k: mean_over_ranks(v) for k, v in logs.items()},
        "grads": {name: mean_over_ranks(p.grad) for name, p in model.named_parameters()},
    }


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
    batch = {k: local_rows(v, rank, world_size) for k, v in inp["batch"].items()}
    loss, logs = engine(batch, inp["step"])
    engine.backward(loss)
    engine.step()
    return {"loss": mean_over_ranks(loss), "logit_scale_shape": list(model.logit_scale.ds_shape)}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inp = torch.load(sys.argv[1], weights_only=True)
    out = {
        "world_size": world_size,
        "contrastive": contrastive_check(inp, rank, world_size),
        "nt_xent": nt_xent_check(inp, rank, world_size),
        "sampled": sampling_check(inp, rank, world_size),
        "train_step": train_step_check(inp, rank, world_size),
    }
    if world_size == 2:  # once is enough: DeepSpeed's import and setup cost more than all other checks
        out["zero3"] = zero3_check(inp, rank, world_size)
    if rank == 0:
        torch.save(out, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
