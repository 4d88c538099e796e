"""A ``stop_requested`` callable for the trainer, set by signals: SLURM's time-limit warning (``--signal
USR2@N``), a preemption / requeue (SIGTERM) or Ctrl-C (SIGINT). The handler only records the signal: the
trainer finishes its step and checkpoints on every rank at the next step boundary, never from inside a
signal handler. A second SIGINT aborts at once: the first one restores the default action, so the kernel
ends the process without waiting for Python (a rank blocked in a collective included).

The data loader's workers ignore these signals (``unimlip_train.data.worker_signals``): a signal sent to a whole
process group (Ctrl-C in a terminal, torchrun forwarding SIGTERM, SLURM at the time limit) reaches them too, and
they must not die before their rank has checkpointed. The rank stops them afterwards.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: set[str] = set()
        self._owner = os.getpid()  # forked loader workers inherit the handler; only the owner talks
        self._muted = False

    def install(self, *signums: int) -> None:
        for signum in signums:
            signal.signal(signum, self._handler)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) rather than by the scheduler."""
        return "SIGINT" in self.received

    def mute(self) -> None:
        """The process is about to end by itself (the hang watchdog): later signals change and say nothing."""
        self._muted = True

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 (signal handler signature)
        if self._muted:
            return
        name = signal.Signals(signum).name
        self.received.add(name)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if os.getpid() == self._owner:
            again = " (Ctrl-C again aborts at once, without a checkpoint)" if signum == signal.SIGINT else ""
            print(f"received {name}: checkpointing after this step{again}", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return bool(self.received)
