"""What the trainer reports between two log steps, and the one place it reads device values for it.

The loss terms are summed on the device (per-step means) and read once per ``train.log_every``: a read per
micro batch would keep a GPU idle between steps. ``StepWindow`` holds those sums with the throughput and
data-wait counters of the window and turns them into the scalars of one log step; ``summary`` is the run's last
line; ``SampleKeyLog`` is the debug log of every micro batch's sample keys used by the exactness tests.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

import unimlip_train.distributed.process_group as du
from unimlip_train.data.skips import SkipStats, global_skip_stats
from unimlip_train.engine.checkpoint import TrainerState
from unimlip_train.engine.monitor import gpu_memory_gib
from unimlip_train.engine.optim import group_lrs

# Debug aid for exactness checks: when set to 1, each rank appends the sample keys of every micro batch to
# run_dir/debug/sample_keys.rank{R}.jsonl as {"start": first step of this launch, "step": step, "epoch": the data
# epoch the batch belongs to, "keys": [...]}.
SAMPLE_LOG_ENV = "UNIMLIP_LOG_SAMPLE_KEYS"


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average device scalars over ranks and read them once (same key order on every rank: sorted)."""
    keys = sorted(values)
    t = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    if du.get_world_size() > 1:
        dist.all_reduce(t)
        t /= du.get_world_size()
    return dict(zip(keys, t.tolist()))


class StepWindow:
    """Since the last log step: the device sums of the logged terms' per-step means (``sums``), the optimizer
    steps they cover (``steps``), the samples read (``samples``, all ranks) and the seconds spent waiting for
    them (``wait``), from ``t0`` on."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.samples = time.time(), 0.0, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add_terms(self, logs: dict[str, torch.Tensor], grad_accum: int) -> None:
        """One micro batch's logged terms, as its share of the step mean (no host read)."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float() / grad_accum

    def scalars(self, engine, optimizer, stream, state: TrainerState, world: int) -> tuple[dict[str, float], SkipStats]:
        """Collective: the log step's scalars (the terms' means over the window's steps, lrs, throughput, data
        wait, skipped steps and samples, grad norm, GPU memory) and the global skip statistics."""
        scalars = mean_over_ranks({k: v / self.steps for k, v in self.sums.items()})
        skips = global_skip_stats(stream)
        elapsed = max(time.time() - self.t0, 1e-9)
        grad_norm = engine.get_global_grad_norm()
        scalars.update({f"lr/{g}": lr for g, lr in group_lrs(optimizer).items()})
        scalars.update(samples_per_s=self.samples / elapsed,
                       samples_per_s_per_gpu=self.samples / elapsed / world,
                       data_wait_frac=min(1.0, self.wait / elapsed),
                       skipped_steps=float(state.nonfinite_total),
                       skipped_samples=float(skips.skipped),
                       samples_read=float(skips.read),
                       samples_seen=float(state.samples_seen))
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if (mem := gpu_memory_gib()) is not None:
            scalars["gpu_mem_gib"] = mem
        scalars.update({f"skipped_by_shard/{os.path.basename(shard)}": float(n) for shard, n in skips.by_shard.items()})
        return scalars, skips


def summary(status: str, state: TrainerState, stream) -> dict:
    """Collective: the run's last record (status: finished, preempted or corrupt_data; the skipped steps and
    samples, the samples read, every shard that lost samples, most first)."""
    skips = global_skip_stats(stream)
    return {"status": status, "skipped_steps": state.nonfinite_total, "skipped_samples": skips.skipped,
            "samples_read": skips.read, "skipped_by_shard": dict(skips.worst(len(skips.by_shard))),
            "rollbacks": state.rollbacks, "rollback_skipped_samples": state.rollback_skipped}


class SampleKeyLog:
    """``run_dir/debug/sample_keys.rank{R}.jsonl`` when ``UNIMLIP_LOG_SAMPLE_KEYS=1`` (see ``SAMPLE_LOG_ENV``)."""

    def __init__(self, run_dir: str, rank: int, start_step: int):
        os.makedirs(os.path.join(run_dir, "debug"), exist_ok=True)
        self.start = start_step
        self.file = open(os.path.join(run_dir, "debug", f"sample_keys.rank{rank}.jsonl"), "a", encoding="utf-8")

    @classmethod
    def if_requested(cls, run_dir: str, rank: int, start_step: int) -> Optional["SampleKeyLog"]:
        return cls(run_dir, rank, start_step) if os.environ.get(SAMPLE_LOG_ENV) == "1" else None

    def write(self, step: int, keys, epoch: int) -> None:
        self.file.write(json.dumps({"start": self.start, "step": step, "epoch": epoch, "keys": list(keys)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
