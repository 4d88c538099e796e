"""The collectives the loss terms need: an autograd all-gather, and an autograd row exchange for ITM.

All-gather: every rank contributes its local rows and receives the global batch; in backward each rank gets
the sum of all ranks' gradients for its own rows (a reduce-scatter). With ranks averaging parameter gradients
(what DeepSpeed does), the mean of the per-rank losses then has exactly the single-process gradient over the
global batch (the open_clip ``gather_with_grad`` scheme). ``exchange_rows`` does the same for a few rows
picked by global index.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather as _autograd_all_gather
from torch.distributed.nn.functional import all_to_all_single as _autograd_all_to_all

from unimlip_train.distributed.process_group import all_reduce_max

# The synchronous autograd collectives. torch 2.14 deprecates them in favour of the functional (async)
# ``all_gather_single_autograd``, but over gloo that one crashed (SIGSEGV) or hung a 2-rank training run after
# ~100 steps here, while this one ran it to the end; hence its deprecation warning is silenced, not heeded.
# One filter at import: a ``warnings.catch_warnings()`` per call would reset every other module's once-only
# warnings each step (DeepSpeed's then repeat hundreds of times).
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)


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


def global_max(value: int) -> int:
    """Largest host integer over ranks (to pad variable-length token states before they move between ranks);
    through the CPU control group, so a CUDA run does not wait for its GPU here."""
    return int(all_reduce_max(value))


def exchange_rows(t: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Rows of the global batch by global index, moving only the rows asked for (an autograd all-to-all).

    ``t``: this rank's local rows (same shape on every rank; global row ``rank * n + i`` is local row ``i``).
    ``wanted``: int64 global indices, the same length on every rank. Returns ``t_global[wanted]``; in
    backward each row's gradient flows back to the rank that owns it. Instead of all-gathering every rank's
    rows (ITM's token states: about 1 GB per GPU at ViT-B, 8 x 256, bf16), each rank receives only
    ``len(wanted)`` rows. The split sizes are read on the host once per call (one small device read).
    """
    rank, world_size = world()
    if world_size == 1:
        return t[wanted]
    n = t.shape[0]
    everyone_wants = all_gather_no_grad(wanted).view(world_size, -1)
    mine = everyone_wants // n == rank  # (destination rank, position): rows of mine each rank wants, in its order
    send_rows = (everyone_wants - rank * n)[mine]
    owner = wanted // n
    order = torch.argsort(owner * len(wanted) + torch.arange(len(wanted), device=wanted.device))
    counts = torch.stack([mine.sum(1), torch.bincount(owner, minlength=world_size)]).tolist()
    received = _autograd_all_to_all(t.new_empty((len(wanted), *t.shape[1:])), t[send_rows].contiguous(),
                                    counts[1], counts[0])
    return received[torch.argsort(order)]


@torch.no_grad()
def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, detached (global normalisers such as the number of masked tokens)."""
    _, world_size = world()
    if world_size == 1:
        return t.detach()
    t = t.detach().clone()
    dist.all_reduce(t)
    return t
