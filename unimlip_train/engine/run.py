"""The one start-up sequence of a training job, for ``unimlip-train`` and the SLURM job (``launch.jobs``) alike.

1. ``check_free`` on every rank, before the rendezvous: a refused launch never waits in one;
2. an explicit ``resume`` checkpoint is resolved now (damaged or missing: one line, before anything starts);
3. the stop flag starts listening to its signals (only now, so a refused start ends the ordinary way);
4. the process group (``init_distributed``);
5. the run dir's lock (``RunLock``: rank 0 takes it, every rank learns the outcome);
6. ``world.json``: this launch's ranks and hosts (``world.record_launch``);
7. the training itself (``Trainer.run``), which checkpoints collectively when a stop is requested.
"""
from __future__ import annotations

import signal
from typing import Optional, Sequence

import unimlip_train.distributed.process_group as du
from unimlip_train.config.schema import Config
from unimlip_train.engine.checkpoint import resolve_checkpoint
from unimlip_train.engine.preemption import PreemptionFlag
from unimlip_train.engine.run_lock import RunLock, check_free
from unimlip_train.engine.trainer import TrainResult, train
from unimlip_train.engine.validation import Validate
from unimlip_train.engine.world import describe_launch, record_launch


class StartRefused(ValueError):
    """The run cannot start as asked (an unusable ``resume`` checkpoint, an unreadable lock): raised on every rank
    before any rendezvous. A run dir held by a live job raises ``RunDirInUse`` instead."""


def run_training(cfg: Config, run_dir: str, resume: str = "auto", stop_requested: Optional[PreemptionFlag] = None,
                 validate: Optional[Validate] = None, listen: Sequence[signal.Signals] = ()) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (``resume``: 'auto', 'none' or a checkpoint path) on every rank of the
    launch; returns 'finished', or 'preempted' after a collective checkpoint once ``stop_requested()`` became
    true on any rank. ``listen``: the signals ``stop_requested`` installs itself for after the checks (a caller
    that must replace another handler early installs it itself). ``validate``: see ``Trainer``."""
    try:
        check_free(run_dir)
        if resume not in ("auto", "none"):
            resolve_checkpoint(resume)
    except ValueError as e:
        raise StartRefused(str(e)) from None
    if listen:
        stop_requested.install(*listen)
    du.init_distributed(cfg.deepspeed.backend)
    with RunLock.acquire(run_dir):  # a requeued run of the same SLURM job takes its own earlier lock over
        world = record_launch(run_dir)
        if du.is_main():
            print(describe_launch(world, run_dir), flush=True)
        return train(cfg, run_dir, resume=resume, stop_requested=stop_requested, validate=validate)
