"""A ``stop_requested`` callable for the trainer, set by signals: SLURM's time-limit warning (``--signal
USR2@N``) or a preemption / requeue (SIGTERM). The handler only records the signal: the trainer finishes
its step and checkpoints on every rank at the next step boundary, never from inside a signal handler."""
from __future__ import annotations

import signal
import sys
from typing import Any


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: set[str] = set()

    def install(self, *signums: int) -> None:
        for signum in signums:
            signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 (signal handler signature)
        name = signal.Signals(signum).name
        self.received.add(name)
        print(f"received {name}: checkpointing after this step", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return bool(self.received)
