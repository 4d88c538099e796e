"""Autograd all-gather: the one collective the contrastive terms need.

Every rank contributes its local rows and receives the global batch; in backward each rank gets the sum of
all ranks' gradients for its own rows (a reduce-scatter). With ranks averaging parameter gradients (what
DeepSpeed does), the mean of the per-rank losses then has exactly the single-process gradient over the
global batch (the open_clip ``gather_with_grad`` scheme).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather as _autograd_all_gather


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0 over the default group, keeping gradients."""
    _, world_size = world()
    if world_size == 1:
        return t
    # The synchronous autograd gather. torch 2.14 deprecates it in favour of the functional (async)
    # ``all_gather_single_autograd``, but over gloo that one crashed (SIGSEGV) or hung a 2-rank training run
    # after ~100 steps here, while this one ran it to the end; hence the warning is silenced, not heeded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(_autograd_all_gather(t.contiguous()), dim=0)


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` along dim 0 over the default group without a backward (indices, masks, ids)."""
    _, world_size = world()
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def global_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over ranks (to pad variable-length token states before a gather)."""
    _, world_size = world()
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, detached (global normalisers such as the number of masked tokens)."""
    _, world_size = world()
    if world_size == 1:
        return t.detach()
    t = t.detach().clone()
    dist.all_reduce(t)
    return t
