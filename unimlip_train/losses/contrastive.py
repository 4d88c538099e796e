"""Contrastive losses with negatives gathered from every rank (open_clip's local-rows scheme).

Each rank all-gathers the embeddings (with autograd), computes only its *local rows* of the logit matrix
against the *global columns*, and offsets its labels by ``rank * local_batch``. Memory is
O(local x global) instead of O(global^2), and the mean over ranks of the losses (and of the parameter
gradients, as DeepSpeed averages them) equals the single-process loss on the concatenated global batch.
All ranks must use the same local batch size (a fixed micro-batch, as DeepSpeed requires anyway).

Identity (``ids``): medical corpora repeat reports verbatim and share one report across a study's images, so
"row i pairs with column i only" would teach the model to separate identical meanings. ``ids`` is a local
int64 tensor of shape (n,) or (n, k) (e.g. report id and group id); two samples are the same when any of
their k ids is equal. In the image-text losses every same-identity column is a positive (multi-positive
InfoNCE, as UniCL / SupCon); in NT-Xent same-identity samples are removed from the negatives.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from unimlip_train.losses.gather import all_gather_no_grad, all_gather_with_grad, global_sum, world


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Logits and softmax in fp32 even when the towers run in bf16/fp16; fp64 stays fp64."""
    return t.float() if t.element_size() < 4 else t


def same_identity(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Boolean (len(ids) x len(other)): True where any of the k identity columns agree."""
    if ids.dim() == 1:
        return ids[:, None] == other[None, :]
    return (ids[:, None, :] == other[None, :, :]).any(-1)


def _local_diagonal(n: int, total: int, rank: int, device: torch.device) -> torch.Tensor:
    """Boolean (n x total): each local row's own column in the global batch."""
    eye = torch.zeros(n, total, dtype=torch.bool, device=device)
    eye[torch.arange(n, device=device), torch.arange(n, device=device) + rank * n] = True
    return eye


def positive_mask(ids: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Local rows x global columns: the sample's own pair, plus every same-identity column when ``ids`` is given."""
    rank, world_size = world()
    mask = _local_diagonal(n, n * world_size, rank, device)
    if ids is not None:
        mask |= same_identity(ids.to(device), all_gather_no_grad(ids.to(device)))
    return mask


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) between rows of ``a`` and ``b``: row i of ``a`` matches
    row i of ``b``, and with ``ids`` also every column of the same identity, each with the same target
    probability (multi-positive InfoNCE: the soft-target cross-entropy of UniCL, Yang et al. 2022).

    ``a``, ``b``: L2-normalised, local_batch x dim. ``logit_scale``: the multiplier 1/temperature (a scalar
    or 1-element tensor, already exponentiated). ``ids=None`` is plain CLIP. Gathers over the default
    process group when one is initialised with more than one rank; single-process InfoNCE otherwise.
    """
    a, b = at_least_fp32(a), at_least_fp32(b)
    rank, _ = world()
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
    scale = logit_scale.to(a.dtype).reshape(())
    logits_ab, logits_ba = scale * a @ b_all.T, scale * b @ a_all.T
    if ids is None:
        target = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    else:
        positives = positive_mask(ids, a.shape[0], a.device).to(a.dtype)
        target = positives / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target)) / 2


def sigmoid_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                 ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023): every (image, text) pair of the global batch is an independent binary
    decision, ``-log sigmoid(z * (scale * a.b + bias))`` with z = +1 for positives (the own pair, and with
    ``ids`` every same-identity pair) and -1 otherwise, summed and divided by the global batch size.

    Each rank scores its local rows of ``a`` against all gathered rows of ``b``, so every pair is scored on
    exactly one rank and memory is O(local x global); the per-rank loss is that rank's sum over its local
    batch size, so the mean over ranks is the single-process loss.
    """
    a, b = at_least_fp32(a), at_least_fp32(b)
    b_all = all_gather_with_grad(b)
    logits = logit_scale.to(a.dtype).reshape(()) * a @ b_all.T + logit_bias.to(a.dtype).reshape(())
    sign = positive_mask(ids, a.shape[0], a.device).to(a.dtype) * 2 - 1
    return -F.logsigmoid(sign * logits).sum() / a.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            ids: Optional[torch.Tensor] = None, center: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020; SLIP's image term) between two views ``z1``, ``z2`` (local x dim).

    Every one of the 2N global embeddings is an anchor whose positive is its other view and whose
    negatives are the remaining 2N - 2 embeddings of the global batch, except, with ``ids``, both views of
    every other same-identity sample (masked out: they are neither negatives nor extra positives). The
    temperature is fixed. Inputs are L2-normalised. Each rank computes its 2 x local anchors against all
    2N candidates.

    ``center``: before the dot products, every embedding has the mean of all 2N global embeddings subtracted
    and is L2-normalised again (the mean carries gradients). Why: a randomly initialised text tower (and
    BERT in general, Ethayarajh 2019) gives every report nearly the same direction, so every pair looks alike
    and the loss starts at its ceiling ln(2N - 1); removing the common mean is BERT-whitening's first step (Su
    et al. 2021) and what a BatchNorm in SLIP / SimCLR's projection head does, but computed here over the
    global batch inside the loss, so it does not depend on how the batch is split over ranks or micro batches.
    """
    z1, z2 = at_least_fp32(z1), at_least_fp32(z2)
    rank, world_size = world()
    n = z1.shape[0]
    total = n * world_size
    candidates = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)], dim=0)  # 2N x dim
    anchors = torch.cat([z1, z2], dim=0)  # 2n x dim
    if center:
        mean = candidates.mean(0, keepdim=True)
        candidates, anchors = F.normalize(candidates - mean, dim=-1), F.normalize(anchors - mean, dim=-1)
    logits = anchors @ candidates.T / temperature
    local = torch.arange(n, device=z1.device) + rank * n
    positive = torch.cat([local + total, local])
    excluded = positive_mask(ids, n, z1.device).repeat(2, 2)  # own sample (both views) and same identity
    excluded[torch.arange(2 * n, device=z1.device), positive] = False
    return F.cross_entropy(logits.masked_fill(excluded, float("-inf")), positive)


def uniformity_loss(z: torch.Tensor, ids: Optional[torch.Tensor] = None, t: float = 2.0) -> torch.Tensor:
    """Uniformity (Wang & Isola 2020): log of the mean of exp(-t ||z_i - z_j||^2) over the ordered pairs
    i != j of the global batch, leaving out, with ``ids``, pairs of the same identity. ``z``: L2-normalised,
    local x dim.

    The log of a mean over all pairs is not a mean over ranks, so each rank returns the global value with a
    gradient scaled to make the ranks' mean gradient exact: rank r's pair sum S_r enters as
    W * S_r / S (S the global sum, detached), whose gradient averaged over the W ranks is grad S / S =
    grad log S.
    """
    z = at_least_fp32(z)
    _, world_size = world()
    sq_dist = (2 - 2 * z @ all_gather_with_grad(z).T).clamp(min=0)  # unit vectors: |a - b|^2 = 2 - 2 a.b
    excluded = positive_mask(ids, z.shape[0], z.device)
    local = torch.exp(-t * sq_dist).masked_fill(excluded, 0.0).sum()
    total, count = global_sum(local).clamp(min=1e-30), global_sum((~excluded).sum().to(z.dtype))
    value = torch.where(count > 0, torch.log(total / count.clamp(min=1.0)), torch.zeros_like(total))
    return value + world_size * (local - local.detach()) / total  # no pair at all (one identity): 0, no gradient
