"""``TrainingHealth``: what the trainer's hooks call, so that ``trainer.py`` only says where they happen.

* the hang watchdog (``watchdog``): ``crumb`` before collectives, ``after_step`` / ``progress`` as beats;
* the loss-spike guard (``spike``, ``rollback``): ``add_loss`` per micro batch; the step-boundary agreement
  (``agree``) carries the largest rank loss of an earlier step next to the stop and checkpoint flags, so every
  rank feeds the same losses to its detector and decides the same rollback without a collective of its own;
* the stragglers' times (``stragglers``): the boundary wait, gathered at log steps (``rank_times``);
* the sample keys of the steps a rollback may skip (``saw``), listed in ``RUN_DIR/rollbacks.jsonl``;
* fault injection (``faults``).

The loss reaches the host one step late: after each step its value is copied into pinned memory without
blocking and an event is recorded; the value of step s is read at the boundary before step s + 2, when that
copy has long finished, so the read never waits for the device. Detection is one step later for it, which
the rollback's choice of checkpoint allows for (``rollback.target_bound``).
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Optional

import torch

import unimlip_train.distributed.process_group as du
from unimlip_train.config.schema import Config
from unimlip_train.engine.checkpoint import TrainerState
from unimlip_train.engine.health.faults import Faults
from unimlip_train.engine.health.spike import Spike, SpikeDetector
from unimlip_train.engine.health.stragglers import RankTimes
from unimlip_train.engine.health.watchdog import HangWatchdog


class LossReader:
    """Per-step loss sums on the device, read on the host ``LAG`` steps later without waiting for the device."""

    LAG = 1

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sum: Optional[torch.Tensor] = None
        self.queue: deque = deque()  # (step, host tensor, event or None)

    def add(self, loss: torch.Tensor, grad_accum: int) -> None:
        part = loss.detach().float() / grad_accum
        self.sum = part if self.sum is None else self.sum + part

    def step_done(self, step: int) -> None:
        if self.sum is None:
            return
        if self.cuda:
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(self.sum, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.queue.append((step, host, event))
        else:
            self.queue.append((step, self.sum, None))
        self.sum = None

    def take(self, lag: int = LAG) -> tuple[int, float]:
        """(step, loss) of the oldest step ``lag`` steps back, or (-1, -inf) when there is none yet."""
        if len(self.queue) <= lag:
            return -1, -math.inf
        step, host, event = self.queue.popleft()
        if event is not None:
            event.synchronize()  # recorded a step ago: done already (with lag 0: waits for the device)
        value = float(host)
        return step, value if not math.isnan(value) else math.inf

    def clear(self) -> None:
        self.sum, self.queue = None, deque()


class TrainingHealth:
    """One per rank and training loop (``Trainer.start``); every method is cheap unless it says it is collective."""

    #: sample keys held for ``rollbacks.jsonl`` at most (the oldest steps' are dropped first: a run without
    #: periodic checkpoints would otherwise hold every key it read)
    MAX_KEYS = 200_000

    def __init__(self, cfg: Config, run_dir: str, state: TrainerState, rank: int, world: int, device: torch.device,
                 on_hang: Optional[Callable[[], Optional[str]]] = None, on_fire: Optional[Callable[[], None]] = None):
        t = cfg.train
        self.rank = rank
        self.watchdog = HangWatchdog(run_dir, rank, world, t.hang_timeout_s, on_hang, on_fire) \
            if t.hang_timeout_s > 0 else None
        self.detector = SpikeDetector(t.spike_factor, t.spike_window, t.spike_patience, state.loss_history) \
            if t.spike_factor > 0 else None
        self.losses = LossReader(device)
        self.ranks = RankTimes(rank)
        self.faults = Faults.from_env(rank)
        self.keys: dict[int, list] = {}  # step -> this rank's sample keys, since ``key_floor``
        self.key_count = 0
        self.key_floor = -1
        self.spike: Optional[Spike] = None  # confirmed on every rank alike: the trainer rolls back
        self.abandoned: dict[int, float] = {}  # the agreed losses since the last rollback target candidate
        self._held_at = -1

    # -------------------------------------------------------------------------------- loop start and end
    def start(self, step: int) -> None:
        """Collective, when the loop starts at ``step``."""
        self.key_floor = step
        if self.watchdog is not None:
            self.watchdog.start(step)

    def close(self) -> None:
        """When the loop ends (also by an exception): a watchdog that fired ends the process itself."""
        if self.watchdog is not None:
            self.watchdog.stop()

    # -------------------------------------------------------------------------------------- step hooks
    def crumb(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.crumb(what)

    def before_step(self, step: int, optimizer) -> None:
        self.faults.before_step(step, optimizer)

    def before_batch(self) -> None:
        self.faults.before_batch()

    def saw(self, step: int, keys) -> None:
        if self.detector is None:
            return
        self.keys.setdefault(step, []).extend(keys)
        self.key_count += len(keys)
        while self.key_count > self.MAX_KEYS and len(self.keys) > 1:
            oldest = min(self.keys)
            self.key_count -= len(self.keys.pop(oldest))
            self.key_floor = max(self.key_floor, oldest)
            self.abandoned = {s: v for s, v in self.abandoned.items() if s > oldest}

    def add_loss(self, loss: torch.Tensor, grad_accum: int) -> None:
        if self.detector is not None:
            self.losses.add(loss, grad_accum)

    def after_step(self, step: int) -> None:
        self.losses.step_done(step)
        if self.watchdog is not None:
            self.watchdog.beat(step)

    def progress(self, step: int) -> None:
        """A checkpoint or an evaluation finished."""
        if self.watchdog is not None:
            self.watchdog.beat(step, stepped=False)

    # ------------------------------------------------------------------------- the step-boundary agreement
    def agree(self, flags: list[float]) -> list[float]:
        """Collective: the max over ranks of ``flags``, with the spike guard's loss carried along."""
        self.crumb("step boundary: stop / checkpoint / loss agreement (all_reduce max, control group)")
        step, loss = self.losses.take() if self.detector is not None else (-1, -math.inf)
        t = time.time()
        agreed = du.all_reduce_max_many([*flags, loss])
        self.ranks.waited(time.time() - t)
        self._judge([step], agreed[-1:])
        return agreed[:-1]

    def _judge(self, steps: list, agreed: list) -> None:
        for step, loss in zip(steps, agreed):
            if step >= 0:
                self.abandoned[step] = loss
                self.spike = self.detector.update(step, loss) or self.spike

    @property
    def spike_pending(self) -> bool:
        return self.detector is not None and self.detector.spike_pending

    def holds_checkpoint(self, step: int, event: Callable[[str], None]) -> bool:
        """Collective, when a checkpoint is due: judge the losses not read yet (the save waits for the device
        anyway), so that the saved window is complete up to ``step``; True (with one message per step) while a
        spike is pending or confirmed: its weights may be diverging."""
        if self.detector is None:
            return False
        unread = [self.losses.take(lag=0) for _ in range(len(self.losses.queue))]
        if unread:
            self.crumb("checkpoint: the unread losses' agreement (all_reduce max, control group)")
            self._judge([s for s, _ in unread], du.all_reduce_max_many([loss for _, loss in unread]))
        if not self.spike_pending and self.spike is None:
            return False
        if self._held_at != step:
            self._held_at = step
            spike = self.spike or self.detector.pending
            event(f"step {step}: no checkpoint while a loss spike is pending (since step {spike.first_step}: "
                  f"loss above {spike.limit:.4g})")
        return True

    # ----------------------------------------------------------------------------------------- rollback
    def checkpointed(self, step: int, previous: int) -> None:
        """A checkpoint of ``step`` was written; ``previous``: the one before it, the oldest a rollback goes to."""
        self.progress(step)
        if previous > self.key_floor:
            self.key_floor = previous
        self._forget_up_to(self.key_floor)

    def _forget_up_to(self, step: int) -> None:
        self.keys = {s: k for s, k in self.keys.items() if s > step}
        self.key_count = sum(len(k) for k in self.keys.values())
        self.abandoned = {s: v for s, v in self.abandoned.items() if s > step}

    def keys_since(self, step: int) -> tuple[list, int]:
        """This rank's sample keys of the steps after ``step`` (in step order) and how many steps after it are not
        in memory (trained by an earlier launch, or before the floor)."""
        keys = [k for s in sorted(self.keys) if s > step for k in self.keys[s]]
        return keys, max(0, self.key_floor - step)

    def rolled_back(self, to_step: int) -> None:
        self.spike = None
        self.losses.clear()
        if self.detector is not None:
            self.detector.forget_pending()
        self.keys = {s: k for s, k in self.keys.items() if s <= to_step}
        self.key_count = sum(len(k) for k in self.keys.values())
        self.abandoned = {}
        self.key_floor = min(self.key_floor, to_step)

    # --------------------------------------------------------------------------------------- stragglers
    def rank_times(self, t0: float, steps: int, data_wait: float) -> dict:
        self.crumb("log step: per-rank times (all_gather_object, control group)")
        return self.ranks.gather(t0, steps, data_wait)
