"""The callables Submitit runs inside a SLURM job (or locally): training that requeues itself, evaluation, and an
ablation run (training, then its evaluation into the run dir's cache).

Training and preemption, step by step:
1. SLURM sends ``USR2`` ``--signal-seconds`` before the time limit (or ``scancel --signal USR2`` does). Our
   handler, installed over Submitit's own, only sets a flag: checkpointing from a signal handler could
   interrupt a collective half way and deadlock the other ranks.
2. The trainer sees the flag at the next step boundary (all ranks agree with an all-reduce), writes a
   checkpoint collectively and returns ``preempted``.
3. Rank 0 runs ``scontrol requeue``; every rank then exits *without* writing a Submitit result, so a client
   waiting on the job keeps waiting for the requeued run, which resumes from ``latest`` (``resume="auto"``).

``SIGTERM`` (``scontrol requeue`` from outside, preemption in REQUEUE mode, ``scancel``) sets the same flag:
the job checkpoints at the next step if SLURM's grace period (``KillWait`` / ``GraceTime``) allows, then exits
without a result and *without* requeueing itself, since SLURM decides whether this job comes back. The
rerun resumes from that checkpoint, or from the last periodic one if the grace period ran out.

A hung job (``train.hang_timeout_s`` without progress; ``unimlip_train.engine.health.watchdog``) is requeued like a
preempted one, counted against ``--max-requeues``: the rank that writes the ``hung`` summary line runs
``scontrol requeue`` before every rank exits with status 4; past the limit it is not requeued and the job fails.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import submitit
import torch.distributed as dist

from unimlip_train.ablation.evaluate import EvalSpec, evaluate_run
from unimlip_train.config.load import config_from_dict
from unimlip_train.distributed.process_group import all_reduce_max
from unimlip_train.engine.preemption import PreemptionFlag
from unimlip_train.engine.run import run_training
from unimlip_train.eval.run import run_eval
from unimlip_train.eval.validate import validate_with_examples
from unimlip_train.export import resolve_checkpoint

CALLER_ENV_PREFIX = "UNIMLIP_"


def caller_environment() -> dict[str, str]:
    """The submitting shell's ``UNIMLIP_*`` variables (debug logs, fault injection), which a job sets again
    when it starts: sbatch exports the caller's environment only where the site leaves ``--export=ALL``."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(CALLER_ENV_PREFIX)}


def _apply_environment(env: dict[str, str]) -> None:
    os.environ.update(env)
    if env:
        print(f"unimlip job: from the submitter's environment: {', '.join(f'{k}={v}' for k, v in env.items())}",
              flush=True)


class WithCallerEnvironment:
    """``fn`` run with the submitter's ``UNIMLIP_*`` variables (for the plain functions of the shard jobs)."""

    def __init__(self, fn):
        self.fn, self.env = fn, caller_environment()

    def __call__(self, *args, **kwargs):
        _apply_environment(self.env)
        return self.fn(*args, **kwargs)


class RequeueLimitReached(RuntimeError):
    """Preempted again after ``--max-requeues`` requeues: the job fails so someone looks at it."""


def _slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` needs (``ARRAYID_TASK`` for array tasks), None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_count() -> int:
    """How many times SLURM has requeued this job (0 on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class TrainJob(submitit.helpers.Checkpointable):
    """``unimlip_train.engine.run.run_training`` on every task of the job, with self-requeue on preemption.

    It stays a Submitit ``Checkpointable`` for the window before ``__call__`` replaces Submitit's USR2
    handler: should the signal land there, Submitit resubmits this same object, and the rerun resumes
    from the run directory all the same.
    """

    def __init__(self, config: dict, run_dir: str, max_requeues: int):
        self.config = config  # resolved Config as a plain dict (no pickled classes across versions)
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.env = caller_environment()  # captured on the submitting machine

    def __call__(self) -> Any:
        _apply_environment(self.env)
        flag = PreemptionFlag()
        flag.install(signal.SIGUSR2, signal.SIGTERM)  # after Submitit's setup, so ours win
        dist_env = _export_rendezvous()
        print(f"unimlip job: rank {dist_env.rank}/{dist_env.world_size} (local {dist_env.local_rank}), "
              f"rendezvous {dist_env.master_addr}:{dist_env.master_port}, requeues so far {requeue_count()}, "
              f"run dir {self.run_dir}", flush=True)
        cfg = config_from_dict(self.config, source=os.path.join(self.run_dir, "config.yaml"))
        # Another live job on this run dir fails now, on every task, before the rendezvous; a requeued run of
        # this job takes its own earlier lock over.
        result = run_training(cfg, self.run_dir, resume="auto", stop_requested=flag, validate=validate_with_examples,
                              on_hang=self._requeue_hung)
        if result.status != "preempted":
            _shutdown_process_group()
            return result
        print(f"unimlip job: {'+'.join(sorted(flag.received))} received, checkpointed at step {result.step}",
              flush=True)
        if _slurm_job_id() is None:
            return result  # not under SLURM: nothing to requeue, the caller sees "preempted"
        # Any rank's USR2 (the time-limit warning) means requeue: SLURM may signal only some tasks.
        if all_reduce_max(1.0 if "SIGUSR2" in flag.received else 0.0) > 0:
            self._requeue(dist_env.rank, result.step)
        _shutdown_process_group()
        raise SystemExit(0)  # no result: Submitit catches Exception, not SystemExit

    def _requeue(self, rank: int, step: int) -> None:
        """Rank 0 puts the job back in the queue, unless it has been requeued ``max_requeues`` times."""
        job_id = _slurm_job_id()
        if requeue_count() >= self.max_requeues:
            _shutdown_process_group()
            raise RequeueLimitReached(
                f"preempted at step {step} after {requeue_count()} requeues (--max-requeues {self.max_requeues}); "
                f"the checkpoint is in {self.run_dir}: resubmit to continue")
        if rank == 0:
            done = _scontrol_requeue(job_id)
            if done.returncode != 0:
                _shutdown_process_group()
                raise RuntimeError(f"scontrol requeue {job_id} failed ({done.returncode}): {done.stderr.strip()}; "
                                   f"the checkpoint at step {step} is in {self.run_dir}: resubmit to continue")
            print(f"unimlip job: requeued {job_id} (requeue {requeue_count() + 1} of at most {self.max_requeues})",
                  flush=True)

    def _requeue_hung(self) -> str:
        """The hang watchdog's last act (on the rank that writes the ``hung`` line, in the watchdog's thread):
        requeue the job like a preempted one, within ``max_requeues``; returns what it did, for that line."""
        job_id = _slurm_job_id()
        if job_id is None:
            return "not under SLURM: rerun to resume"
        if requeue_count() >= self.max_requeues:
            return (f"not requeued: {requeue_count()} requeues already (--max-requeues {self.max_requeues}); "
                    f"the job fails, resubmit to resume from {self.run_dir}")
        done = _scontrol_requeue(job_id)
        if done.returncode != 0:
            return f"scontrol requeue {job_id} failed ({done.returncode}): {done.stderr.strip()}"
        return f"requeued {job_id} (requeue {requeue_count() + 1} of at most {self.max_requeues})"


def _scontrol_requeue(job_id: str) -> subprocess.CompletedProcess:
    """The requeue makes SLURM send SIGTERM to every process of the job, scontrol included; with the signal
    blocked in the calling thread (a child inherits its mask) scontrol still exits cleanly, and ours arrives
    after (in the main thread, which the stop flag handles)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class AblationJob(TrainJob):
    """The array task of ``unimlip-ablate --submit``: train one config (requeueing itself on preemption, exactly as
    ``unimlip-submit train`` does), then evaluate its final checkpoint on rank 0 into the run dir's cache, so the
    table is built without a GPU on the login node."""

    def __init__(self, config: dict, run_dir: str, max_requeues: int, spec: EvalSpec):
        super().__init__(config, run_dir, max_requeues)
        self.spec = spec

    def __call__(self):
        result = super().__call__()  # returns only once training finished (preemption exits or requeues)
        if result.status == "finished" and int(os.environ.get("RANK", "0")) == 0:
            evaluate_run(Path(self.run_dir), resolve_checkpoint(self.run_dir), self.spec)
        return result


def _export_rendezvous():
    """Ranks and rendezvous from SLURM into torch's env variables. Every task keeps seeing all of the node's
    GPUs (``set_cuda_visible_devices=False``): the trainer picks ``cuda:LOCAL_RANK``, which would not exist if
    each task saw only its own GPU."""
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _shutdown_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EvalJob:
    """``unimlip-eval`` on every task of the job (ranks from SLURM, metrics JSON into the run dir): its arguments as
    ``unimlip-eval`` parsed them on the submitting machine, with ``--out`` set to ``out``."""

    def __init__(self, args: argparse.Namespace, out: str):
        self.args = argparse.Namespace(**{**vars(args), "out": out})
        self.out = out
        self.env = caller_environment()  # captured on the submitting machine

    def __call__(self) -> dict:
        _apply_environment(self.env)
        _export_rendezvous()
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        try:
            run_eval(self.args)
        except SystemExit as e:  # its usage errors exit; make them a failed job with the message
            if e.code not in (None, 0):
                raise RuntimeError(f"unimlip-eval failed: {e.code}") from None
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        with open(self.out, encoding="utf-8") as f:
            return json.load(f)
