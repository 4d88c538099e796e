"""Stragglers: every rank's step time and data wait at each log step, and the slowest rank named (host:rank).

Per rank, over the log window (means per optimizer step):

* ``rank_step_s/R``: the rank's own time per step, that is the window's wall time minus the time it waited at
  the step boundary for the other ranks (the one all-reduce the trainer runs there). A rank slow in the part of
  its step after the step's last collective (the optimizer update, logging, its own hooks) arrives last there
  and shows the largest value.
* ``rank_data_wait_s/R``: the time it waited for its loader. A rank slow before one of the step's collectives
  (most often: its data) makes every other rank wait inside that collective, so their step times rise with
  its own; its loader wait is what tells it apart.

``slowest`` (``host:rank``) and ``slowest_rank`` name the rank with the largest step time plus loader wait.
Gathered once per log step (``all_gather_object`` over the CPU control group, a few bytes per rank), never per
step. On GPUs these are host times: a rank whose device is slow shows up in the wait of the first host read
that needs that device's result, so prefer the data wait and a profiler there.
"""
from __future__ import annotations

import socket
import time

import unimlip_train.distributed.process_group as du


class RankTimes:
    def __init__(self, rank: int):
        self.name = f"{socket.gethostname()}:{rank}"
        self.boundary_wait = 0.0

    def waited(self, seconds: float) -> None:
        """Time spent in the step-boundary agreement (waiting for the slowest rank)."""
        self.boundary_wait += seconds

    def gather(self, t0: float, steps: int, data_wait: float) -> dict:
        """Collective, at a log step: the window's per-rank scalars and the slowest rank's name (a str)."""
        steps = max(steps, 1)
        own = max(0.0, time.time() - t0 - self.boundary_wait) / steps
        everyone = du.all_gather_object((self.name, own, data_wait / steps))
        self.boundary_wait = 0.0
        out: dict = {}
        for rank, (_, step_s, wait_s) in enumerate(everyone):
            out[f"rank_step_s/{rank}"] = step_s
            out[f"rank_data_wait_s/{rank}"] = wait_s
        slowest = max(range(len(everyone)), key=lambda r: everyone[r][1] + everyone[r][2])
        out.update(step_s_max=max(e[1] for e in everyone), step_s_min=min(e[1] for e in everyone),
                   data_wait_s_max=max(e[2] for e in everyone), slowest_rank=float(slowest),
                   slowest=everyone[slowest][0])
        return out
