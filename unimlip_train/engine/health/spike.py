"""The loss-spike detector: a loss above ``factor`` x the running median of recent normal losses for ``patience``
steps in a row is a divergence worth rolling back.

The median is over the last ``window`` losses that were not spikes; it is judged once ``min(window, MIN_HISTORY)``
of them are known and while it is positive. Spike losses stay out of the window, also those of a blip shorter
than ``patience`` (an outlier must not raise the bar for the next one). Non-finite losses are neither: their steps
were skipped (``limits.NonFiniteSteps``), and the streak goes on across them.

Pure Python on host floats, the same on every rank when fed the same agreed losses (``guard.TrainingHealth``);
tested against a naive recomputation in tests/test_health.py. The window lives in the trainer state
(``TrainerState.loss_history``), so a resumed or requeued run judges its first steps against the losses before.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Optional

MIN_HISTORY = 10


@dataclass
class Spike:
    """A confirmed spike: its losses by step (the first is where it began) and the bar they stood above."""

    losses: dict[int, float] = field(default_factory=dict)
    median: float = 0.0
    limit: float = 0.0

    @property
    def first_step(self) -> int:
        return min(self.losses)

    @property
    def last_step(self) -> int:
        return max(self.losses)


class SpikeDetector:
    """``history``: the window's losses, oldest first, updated in place (the trainer state's list)."""

    def __init__(self, factor: float, window: int, patience: int, history: Optional[list] = None):
        self.factor, self.window, self.patience = factor, window, patience
        self.history = [] if history is None else history
        del self.history[:-window]  # a window made smaller since the checkpoint
        self._sorted = sorted(self.history)  # the median without sorting per step
        self.pending = Spike()

    @property
    def spike_pending(self) -> bool:
        """Some of the latest losses were spikes, fewer than ``patience`` so far."""
        return bool(self.pending.losses)

    def median(self) -> Optional[float]:
        """The running median, None until ``min(window, MIN_HISTORY)`` normal losses are known."""
        n = len(self._sorted)
        if n < min(self.window, MIN_HISTORY):
            return None
        mid = n // 2
        return self._sorted[mid] if n % 2 else (self._sorted[mid - 1] + self._sorted[mid]) / 2

    def update(self, step: int, loss: float) -> Optional[Spike]:
        """Feed ``step``'s loss (in step order); the Spike once ``patience`` spike losses came in a row."""
        if not math.isfinite(loss):
            return None
        median = self.median()
        if median is not None and median > 0 and loss > self.factor * median:
            self.pending.losses[step] = loss
            self.pending.median, self.pending.limit = median, self.factor * median
            if len(self.pending.losses) < self.patience:
                return None
            spike, self.pending = self.pending, Spike()
            return spike
        self.pending = Spike()
        self.history.append(loss)
        bisect.insort(self._sorted, loss)
        if len(self.history) > self.window:
            self._sorted.pop(bisect.bisect_left(self._sorted, self.history.pop(0)))
        return None

    def forget_pending(self) -> None:
        """After a rollback: the streak that caused it is over."""
        self.pending = Spike()
