"""How the trainer notices a run going bad, the same way on every rank: non-finite steps and corrupt data.

A non-finite loss or gradient skips the optimizer step on every rank (DeepSpeed's overflow check under ZeRO;
``drop_gradients_unless_finite`` without it), is counted (``TrainerState.nonfinite_total``, a line in
metrics.jsonl) and becomes fatal after ``train.max_nonfinite_in_row`` in a row (``NonFiniteLossError``).
Too many corrupt samples end the run after a checkpoint (``CorruptDataError``, raised by the log step).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from unimlip_train.engine.checkpoint import TrainerState
from unimlip_train.engine.monitor import Monitor


class NonFiniteLossError(RuntimeError):
    """Raised (on every rank) after ``train.max_nonfinite_in_row`` consecutive skipped (non-finite) steps."""


class CorruptDataError(RuntimeError):
    """Raised (on every rank, after a checkpoint) when more than ``data.max_skip_fraction`` of the samples read
    were corrupt."""


def drop_gradients_unless_finite(finite: torch.Tensor, model: torch.nn.Module, world: int) -> torch.Tensor:
    """Without ZeRO, before the optimizer step: agree on finiteness (one host read per step) and drop a
    non-finite step's gradients, so that the optimizer leaves every parameter alone."""
    flag = finite.to(torch.float64).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    ok = bool(flag.item())
    if not ok:
        for p in model.parameters():
            p.grad = None
    return torch.tensor(ok)


class NonFiniteSteps:
    """Counts the skipped steps of one launch; the ``limit``-th in a row raises ``NonFiniteLossError``."""

    def __init__(self, limit: int):
        self.limit, self.in_row = limit, 0

    def count(self, skipped: bool, state: TrainerState, monitor: Monitor,
              latest: Callable[[], Optional[str]]) -> None:
        """After each optimizer step: ``skipped`` is the same on every rank. ``latest()`` names the checkpoint
        to resume from in the message."""
        if not skipped:
            self.in_row = 0
            return
        state.nonfinite_total += 1
        self.in_row += 1
        monitor.event(f"step {state.step}: non-finite loss or gradients on some rank; optimizer step skipped "
                      f"({self.in_row} in a row, {state.nonfinite_total} in total)")
        if self.in_row >= self.limit:
            checkpoint = latest()
            raise NonFiniteLossError(
                f"{self.in_row} non-finite steps in a row at step {state.step} "
                f"(train.max_nonfinite_in_row={self.limit}); stopping. Lower train.lr or check the data"
                + (f", then resume from {checkpoint}" if checkpoint else ""))
