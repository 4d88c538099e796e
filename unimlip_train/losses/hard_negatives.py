"""Hard-negative sampling for image-text matching, identical on every rank for a given (seed, step).

ALBEF (Li et al. 2021) / BLIP sample, for each image, one negative text with probability
softmax(similarity / temperature) over the other texts of the (gathered) batch, and likewise one negative
image per text. We draw that sample with the Gumbel-max trick: argmax(logits + Gumbel noise), with the positive
and every sample of the same report or group excluded (a verbatim duplicate of the positive report is no
negative: at a high logit scale it would be drawn nearly every time). The noise is a counter-based hash of (seed, step, stream, global row, column), so each rank
computes only its own rows, on any device, and a distributed run picks exactly the negatives a
single-process run on the global batch would pick.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer avalanche hash on int64 tensors holding 32-bit values (multipliers < 2^31: no overflow)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, step: int, stream: int, rows: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Standard Gumbel noise for global ``rows`` x ``num_cols`` columns, a pure function of its arguments."""
    key = torch.tensor(seed & _MASK32, dtype=torch.long, device=rows.device)
    key = _hash32(_hash32(_hash32(key) ^ (step & _MASK32)) ^ stream)
    cols = torch.arange(num_cols, device=rows.device, dtype=torch.long)
    h = _hash32(_hash32(key ^ rows.long()[:, None]) ^ cols[None, :])
    u = (h.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, excluded: torch.Tensor, row_offset: int, seed: int, step: int,
                          stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row, drawn with probability softmax(logits row) over the columns not ``excluded``.

    ``logits``: local rows x global columns; ``excluded``: a boolean mask of the same shape (the own pair and
    every same-identity column, ``contrastive.positive_mask``); the local rows are global rows
    ``row_offset ...``. Returns ``(columns, valid)``: the sampled global column indices (long) and whether the
    row had any allowed column at all (where not, its column is meaningless). ``stream`` separates independent
    draws of one step (e.g. 0 for image->text, 1 for text->image).
    """
    n, num_cols = logits.shape
    rows = torch.arange(n, device=logits.device) + row_offset
    scores = (logits.double() + gumbel_noise(seed, step, stream, rows, num_cols)).masked_fill(excluded, float("-inf"))
    return scores.argmax(dim=1), ~excluded.all(dim=1)
