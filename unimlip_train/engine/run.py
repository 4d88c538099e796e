"""The one start-up sequence of a training job, for ``unimlip-train`` and the SLURM job (``launch.jobs``) alike.

0. a rank started by a launcher follows it (``health.parent``): from here on, it exits when its launcher dies;
1. ``check_free`` on every rank, before the rendezvous: a refused launch never waits in one;
2. ``start_checks``, on every rank, before any process group and before the run dir is made: what the config
   alone cannot show (hub ids missing from an offline cache, a tokenizer folder without a tokenizer, a model
   that cannot be built from these settings) and the checkpoint it would resume (explicit, or the newest intact
   one in the run dir: damaged, missing, or of another model shape); each refusal is one line (exit status 2);
3. the stop flag starts listening to its signals (only now, so a refused start ends the ordinary way);
4. the process group (``init_distributed``; its collectives time out only after the hang watchdog would act);
5. the run dir's lock (``RunLock``: rank 0 takes it, every rank learns the outcome);
6. ``world.json``: this launch's ranks and hosts (``world.record_launch``);
7. the training itself (``Trainer.run``), which checkpoints collectively when a stop is requested, and whose
   hang watchdog ends a stuck job (``on_hang`` runs first: the SLURM job requeues itself there).
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Optional, Sequence

import torch

import unimlip_train.distributed.process_group as du
from unimlip_train.config.schema import Config
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.engine.checkpoint import check_compatible, newest_complete, resolve_checkpoint
from unimlip_train.engine.health.parent import LauncherWatch, following
from unimlip_train.engine.health.watchdog import collective_timeout_s
from unimlip_train.engine.preemption import PreemptionFlag
from unimlip_train.engine.run_lock import RunLock, check_free
from unimlip_train.engine.trainer import TrainResult, train
from unimlip_train.engine.validation import Validate
from unimlip_train.engine.world import describe_launch, record_launch
from unimlip_train.models.build import build_model
from unimlip_train.models.pretrained import offline_misses


class StartRefused(ValueError):
    """The run cannot start as asked (an unusable ``resume`` checkpoint, an unreadable lock): raised on every rank
    before any rendezvous. A run dir held by a live job raises ``RunDirInUse`` instead."""


def run_training(cfg: Config, run_dir: str, resume: str = "auto", stop_requested: Optional[PreemptionFlag] = None,
                 validate: Optional[Validate] = None, listen: Sequence[signal.Signals] = (),
                 on_hang: Optional[Callable[[], Optional[str]]] = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (``resume``: 'auto', 'none' or a checkpoint path) on every rank of the
    launch; returns 'finished', or 'preempted' after a collective checkpoint once ``stop_requested()`` became
    true on any rank. ``listen``: the signals ``stop_requested`` installs itself for after the checks (a caller
    that must replace another handler early installs it itself). ``validate``, ``on_hang``: see ``Trainer``."""
    watch = LauncherWatch.start_if_launched(du.env_rank())
    check_free(run_dir)
    start_checks(cfg, run_dir, resume)
    if listen:
        stop_requested.install(*listen)
    du.init_distributed(cfg.deepspeed.backend, collective_timeout_s(cfg.train.hang_timeout_s))
    # a requeued run of the same SLURM job takes its own earlier lock over
    with RunLock.acquire(run_dir), following(watch):
        world = record_launch(run_dir)
        if du.is_main():
            print(describe_launch(world, run_dir), flush=True)
        return train(cfg, run_dir, resume=resume, stop_requested=stop_requested, validate=validate, on_hang=on_hang)


def start_checks(cfg: Config, run_dir: str, resume: str = "auto") -> None:
    """``StartRefused`` (one line naming the key or the checkpoint) when the run cannot start as asked; see the
    module doc. Builds the model on the meta device (no memory, no weights loaded): seconds at most."""
    misses = offline_misses(cfg)
    if misses:
        raise StartRefused("; ".join(misses))
    key = "model.tokenizer" if cfg.model.tokenizer else "model.text.name" if cfg.model.text.name else ""
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.text.name)
    except (OSError, ValueError) as e:
        raise StartRefused(f"{key + ': ' if key else ''}{e}") from None
    try:
        with torch.device("meta"):
            skeleton = build_model(cfg, tokenizer, weights=False)
    except (OSError, ValueError, TypeError) as e:  # settings that build no model; a missing hub id offline
        raise StartRefused(f"the model cannot be built from this config: {e}") from None
    try:
        if resume == "auto":
            checkpoints = os.path.join(run_dir, "checkpoints")
            source = newest_complete(checkpoints, announce=False) if os.path.isdir(checkpoints) else None
        else:
            source = resolve_checkpoint(resume) if resume != "none" else None
        if source:
            check_compatible(source, cfg, skeleton)
    except ValueError as e:  # CheckpointError: damaged, missing, another model
        raise StartRefused(str(e)) from None
