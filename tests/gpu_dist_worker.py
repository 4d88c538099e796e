"""tests/dist_loss_worker.py's gathered-negative checks over NCCL, one GPU per rank (test_gpu.py launches it).

Usage: torchrun --standalone --nproc_per_node 2 tests/gpu_dist_worker.py IN.pt OUT.pt
Also compares torch's functional all-gather (``all_gather_single_autograd``) with the synchronous autograd
all-gather that ``losses.gather.all_gather_with_grad`` uses: values and gradients must be equal.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import dist_loss_worker as checks
from unimlip_train.losses.gather import all_gather_with_grad


def to(obj, device):
    """Every tensor of a nested dict / list on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to(v, device) for v in obj)
    return obj


def functional_gather_check(rank: int, device: torch.device) -> dict:
    from torch.distributed._functional_collectives import all_gather_single_autograd

    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(8, 16, generator=g).to(device)
    weights = torch.randn(8 * dist.get_world_size(), 16, generator=torch.Generator().manual_seed(99)).to(device)
    results = []
    for gather in (all_gather_with_grad,
                   lambda t: all_gather_single_autograd(t, gather_dim=0, group=dist.group.WORLD)):
        leaf = x.clone().requires_grad_()
        out = gather(leaf)
        (out * weights).sum().backward()
        results.append((out.detach(), leaf.grad))
    (sync_out, sync_grad), (func_out, func_grad) = results
    return {"values_equal": bool(torch.equal(sync_out, func_out)), "grads_equal": bool(torch.equal(sync_grad, func_grad))}


def main() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    inp = to(torch.load(sys.argv[1], weights_only=True), device)
    out = {
        "world_size": world_size,
        "contrastive": checks.contrastive_check(inp, rank, world_size),
        "nt_xent": checks.nt_xent_check(inp, rank, world_size),
        "sampled": checks.sampling_check(inp, rank, world_size),
        "exchange": checks.exchange_check(inp, rank, world_size),
        "functional_gather": functional_gather_check(rank, device),
    }
    if rank == 0:
        torch.save(to(out, "cpu"), sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
