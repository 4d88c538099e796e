"""Contrastive losses with negatives gathered from every rank (open_clip's local-rows scheme).

Each rank all-gathers the embeddings (with autograd), computes only its *local rows* of the logit matrix
against the *global columns*, and offsets its labels by ``rank * local_batch``. Memory is
O(local x global) instead of O(global^2), and the mean over ranks of the losses (and of the parameter
gradients, as DeepSpeed averages them) equals the single-process loss on the concatenated global batch.
All ranks must use the same local batch size (a fixed micro-batch, as DeepSpeed requires anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unimlip_train.losses.gather import all_gather_with_grad, world


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Logits and softmax in fp32 even when the towers run in bf16/fp16; fp64 stays fp64."""
    return t.float() if t.element_size() < 4 else t


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) between rows of ``a`` and ``b``: row i of ``a`` matches row i of ``b``.

    ``a``, ``b``: L2-normalised, local_batch x dim. ``logit_scale``: the multiplier 1/temperature (a scalar
    or 1-element tensor, already exponentiated). Gathers over the default process group when one is
    initialised with more than one rank; plain single-process InfoNCE otherwise.
    """
    a, b = at_least_fp32(a), at_least_fp32(b)
    rank, _ = world()
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    scale = logit_scale.to(a.dtype).reshape(())
    loss_ab = F.cross_entropy(scale * a @ b_all.T, labels)
    loss_ba = F.cross_entropy(scale * b @ a_all.T, labels)
    return (loss_ab + loss_ba) / 2


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020; SLIP's image term) between two views ``z1``, ``z2`` (local x dim).

    Every one of the 2N global embeddings is an anchor whose positive is its other view and whose
    negatives are the remaining 2N - 2 embeddings of the global batch; the temperature is fixed. Inputs are
    L2-normalised. Each rank computes its 2 x local anchors against all 2N candidates.
    """
    z1, z2 = at_least_fp32(z1), at_least_fp32(z2)
    rank, world_size = world()
    n = z1.shape[0]
    total = n * world_size
    candidates = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)], dim=0)  # 2N x dim
    anchors = torch.cat([z1, z2], dim=0)  # 2n x dim
    logits = anchors @ candidates.T / temperature
    local = torch.arange(n, device=z1.device) + rank * n
    self_idx = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), dtype=logits.dtype, device=z1.device))
    return F.cross_entropy(logits, positive)
