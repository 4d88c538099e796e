"""Rolling back from a diverging update: every rank reloads the newest checkpoint written before the spike began,
the data read since that checkpoint is skipped, and training goes on.

Which checkpoint: the loss of step s is computed with the weights after step s - 1, so when the first loss over
the limit is step S's, the update of step S - 1 may be the divergent one. The target is the newest intact
checkpoint of this layout (world size, ZeRO stage) at or before step S - 2 (``target_bound``); a checkpoint of
step S - 1, written before anyone could know, is passed over. Rank 0 chooses, every rank loads the same one.

What is restored: the model, optimizer and scheduler states (DeepSpeed's own files) and this rank's RNG states;
the step counter and samples seen return to the checkpoint's. What is not: the data stream's position. The
samples read since the checkpoint, which led to the spike, are skipped by design: counted
(``TrainerState.rollback_skipped``, the rollback event's ``skipped_samples``) and listed by key in
``RUN_DIR/rollbacks.jsonl`` (keys of steps trained by an earlier launch are not in memory: counted there as
``steps_without_keys``). The tags written after the target hold the diverging weights: ``latest`` is moved back to
the target and they are removed, so no resume can pick them.

After ``train.max_rollbacks`` rollbacks, or with no checkpoint old enough (``train.keep_checkpoints`` too small),
the next confirmed spike stops the run on every rank: a ``diverged`` summary line, then ``DivergedError`` (exit
status 5 from ``unimlip-train``).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import TYPE_CHECKING, Optional

import unimlip_train.distributed.process_group as du
import unimlip_train.engine.checkpoint as ck
from unimlip_train.engine.checkpoint.save import atomic_write
from unimlip_train.engine.checkpoint.state import TAG_RE
from unimlip_train.engine.health.spike import Spike
from unimlip_train.engine.optim import follow_config_schedule

if TYPE_CHECKING:
    from unimlip_train.engine.trainer import Trainer

#: The exit status of a run stopped by divergence.
DIVERGED = 5
ROLLBACKS_FILE = "rollbacks.jsonl"


class DivergedError(RuntimeError):
    """Raised on every rank when a confirmed loss spike cannot be rolled back (too many rollbacks, no checkpoint
    before it); ``unimlip-train`` exits with status ``DIVERGED``."""


def target_bound(spike: Spike) -> int:
    """The newest step whose checkpoint predates every update that may have caused ``spike``."""
    return spike.first_step - 2


def choose_target(checkpoints_dir: str, bound: int, world: int, zero_stage: int) -> Optional[str]:
    """The newest intact checkpoint at or before step ``bound`` that this layout can load, None if none."""
    tags = sorted(((int(m.group(1)), name) for name in os.listdir(checkpoints_dir) if (m := TAG_RE.match(name))),
                  reverse=True) if os.path.isdir(checkpoints_dir) else []
    for step, name in tags:
        path = os.path.join(checkpoints_dir, name)
        if step > bound or ck.damage(path):
            continue
        saved = ck.read_state(path)
        if (saved.world_size, saved.zero_stage) == (world, zero_stage):
            return path
    return None


def _forget_newer(checkpoints_dir: str, target: str) -> list[str]:
    """Rank 0: ``latest`` back to ``target`` (atomically, first), then the tags after it removed."""
    atomic_write(os.path.join(checkpoints_dir, ck.LATEST), os.path.basename(target) + "\n")
    step = int(TAG_RE.match(os.path.basename(target)).group(1))
    removed = sorted(name for name in os.listdir(checkpoints_dir) if (m := TAG_RE.match(name)) and int(m.group(1)) > step)
    for name in removed:
        shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
    return removed


def _stop(trainer: "Trainer", spike: Spike, why: str) -> None:
    trainer._summary("diverged")
    raise DivergedError(
        f"the loss stayed above {trainer.cfg.train.spike_factor:g} x its running median ({spike.median:.4g}) for "
        f"steps {spike.first_step}-{spike.last_step} (losses up to {max(spike.losses.values()):.4g}); {why}. "
        "Lower train.lr, check the data of those steps, or raise train.max_rollbacks, then rerun to resume")


def roll_back(trainer: "Trainer", spike: Spike) -> dict:
    """Collective (every rank confirmed the same ``spike``): reload, skip, record; returns the event record."""
    cfg, state, health = trainer.cfg, trainer.state, trainer.health
    if state.rollbacks >= cfg.train.max_rollbacks:
        _stop(trainer, spike, f"{state.rollbacks} rollbacks already (train.max_rollbacks={cfg.train.max_rollbacks})")
    health.crumb("rollback: choosing the checkpoint (all_gather_object)")
    choice = choose_target(trainer.manager.dir, target_bound(spike), trainer.world, cfg.deepspeed.zero_stage) \
        if trainer.rank == 0 else None
    target = du.all_gather_object(choice)[0]
    if target is None:
        _stop(trainer, spike, f"no intact checkpoint of this layout at or before step {target_bound(spike)} to roll "
                              "back to (keep train.keep_checkpoints at 2 or more)")
    saved = ck.read_state(target)
    health.crumb("rollback: loading the checkpoint (DeepSpeed load_checkpoint)")
    ck.load_engine(trainer.engine, target)
    follow_config_schedule(trainer.scheduler, trainer.fresh_param_groups(), cfg, saved.step)
    ck.set_rng_state(ck.read_rank_state(target, trainer.rank)["rng"])
    keys, unknown = health.keys_since(saved.step)
    health.crumb("rollback: gathering the skipped sample keys (all_gather_object)")
    all_keys = du.all_gather_object(keys)
    from_step, skipped = state.step, state.samples_seen - saved.samples_seen
    state.step, state.samples_seen = saved.step, saved.samples_seen
    state.rollbacks += 1
    state.rollback_skipped += skipped
    record = {"event": "rollback", "from_step": from_step, "to_step": saved.step, "skipped_samples": skipped,
              "first_spike_step": spike.first_step, "spike_losses": {str(s): v for s, v in spike.losses.items()},
              "median": spike.median, "limit": spike.limit, "checkpoint": target, "rollbacks": state.rollbacks}
    if trainer.rank == 0:
        removed = _forget_newer(trainer.manager.dir, target)
        with open(os.path.join(trainer.run_dir, ROLLBACKS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                                "removed_checkpoints": removed, "steps_without_keys": unknown,
                                "keys": [k for rank_keys in all_keys for k in rank_keys]}) + "\n")
    du.barrier()
    trainer.monitor.log_rollback(record, dict(health.abandoned))
    health.rolled_back(saved.step)
    trainer.last_saved, trainer.start_step = saved.step, min(trainer.start_step, saved.step)
    trainer.window.reset()
    trainer.nonfinite.in_row = 0
    trainer.monitor.event(
        f"rollback {state.rollbacks} of at most {cfg.train.max_rollbacks}: the loss stayed above "
        f"{spike.limit:.4g} ({cfg.train.spike_factor:g} x median {spike.median:.4g}) for steps {spike.first_step}-"
        f"{spike.last_step}; reloaded {target} (step {saved.step}), skipping the {skipped} samples read since "
        f"(keys in {os.path.join(trainer.run_dir, ROLLBACKS_FILE)})")
    return record
