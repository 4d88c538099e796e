"""Training health: every unhealthy end of a job is short, recorded in metrics.jsonl, and recoverable.

  limits.py      non-finite steps skipped and counted, too many corrupt samples (the counted limits)
  parent.py      ranks follow their launcher: a rank whose torchrun / deepspeed / SLURM step dies exits
  watchdog.py    the hang watchdog: no progress for ``train.hang_timeout_s`` -> stack dumps, exit status 4
  spike.py       the loss-spike detector (running median, factor, patience)
  rollback.py    rolling every rank back to the newest checkpoint before a spike, the data since skipped
  stragglers.py  per-rank step and data-wait times at each log step, the slowest rank named
  faults.py      fault injection for the tests (``UNIMLIP_FAULT_HANG``, ``UNIMLIP_FAULT_SPIKE``, ...)
  guard.py       ``TrainingHealth``: the one object the trainer's hooks talk to

The names of ``limits`` stay importable from here, where they lived before this became a package.
"""
from unimlip_train.engine.health.limits import (
    CorruptDataError,
    NonFiniteLossError,
    NonFiniteSteps,
    drop_gradients_unless_finite,
)

__all__ = ["CorruptDataError", "NonFiniteLossError", "NonFiniteSteps", "drop_gradients_unless_finite"]
