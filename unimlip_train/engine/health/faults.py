"""Fault injection for the health tests, read from the environment of each rank (unset: nothing happens).

``UNIMLIP_FAULT_HANG=RANK:STEP``
    that rank sleeps (forever) before that optimizer step: the others block in the step's first collective.
``UNIMLIP_FAULT_SPIKE=STEP``
    the update of that step diverges: its learning rate is multiplied by ``SPIKE_LR_FACTOR`` for that one
    optimizer step (the schedule sets the next step's lr as usual). Adam moves every weight by about its lr, so
    every weight jumps by about 10,000 x lr and the following losses are many times the median. Once per
    process: the steps after a rollback train normally.
``UNIMLIP_FAULT_SLOW_DATA=RANK:SECONDS``
    that rank waits that long for each micro batch, as a slow loader would (the straggler test).

(``UNIMLIP_FAULT_KILL_DURING_SAVE`` lives with the checkpoint writer.)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

HANG_ENV = "UNIMLIP_FAULT_HANG"
SPIKE_ENV = "UNIMLIP_FAULT_SPIKE"
SLOW_DATA_ENV = "UNIMLIP_FAULT_SLOW_DATA"
SPIKE_LR_FACTOR = 1e4


def _parse(name: str, form: str, kinds: tuple, env: dict) -> Optional[tuple]:
    """``env[name]`` split at ':' into ``kinds`` (None when unset); a ValueError naming the variable otherwise."""
    value = env.get(name, "")
    if not value:
        return None
    parts = value.split(":")
    try:
        if len(parts) != len(kinds):
            raise ValueError
        return tuple(kind(part) for kind, part in zip(kinds, parts))
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {form}") from None


@dataclass
class Faults:
    rank: int
    hang_step: Optional[int] = None
    spike_step: Optional[int] = None
    slow_data_s: float = 0.0

    @classmethod
    def from_env(cls, rank: int, env: Optional[dict] = None) -> "Faults":
        env = os.environ if env is None else env
        hang = _parse(HANG_ENV, "RANK:STEP", (int, int), env)
        spike = _parse(SPIKE_ENV, "STEP", (int,), env)
        slow = _parse(SLOW_DATA_ENV, "RANK:SECONDS", (int, float), env)
        return cls(rank, hang_step=hang[1] if hang and hang[0] == rank else None,
                   spike_step=spike[0] if spike else None, slow_data_s=slow[1] if slow and slow[0] == rank else 0.0)

    def before_step(self, step: int, optimizer) -> None:
        """At the start of optimizer step ``step`` (before its batches are read)."""
        if step == self.hang_step:
            print(f"fault injection ({HANG_ENV}): rank {self.rank} sleeps before step {step}", flush=True)
            while True:
                time.sleep(3600)
        if step == self.spike_step:
            self.spike_step = None
            for group in optimizer.param_groups:
                group["lr"] *= SPIKE_LR_FACTOR
            if self.rank == 0:
                print(f"fault injection ({SPIKE_ENV}): the update of step {step} runs at {SPIKE_LR_FACTOR:g} x "
                      "its learning rate", flush=True)

    def before_batch(self) -> None:
        if self.slow_data_s:
            time.sleep(self.slow_data_s)
