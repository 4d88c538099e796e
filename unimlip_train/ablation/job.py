"""The SLURM array task of ``unimlip-ablate --submit``: train one config (requeueing itself on preemption,
exactly as ``unimlip-submit train`` does), then evaluate its final checkpoint on rank 0 into the run dir's
cache, so the table is built without a GPU on the login node."""
from __future__ import annotations

import os
from pathlib import Path

from launch.jobs import TrainJob

from .evaluate import EvalSpec, evaluate_run


class AblationJob(TrainJob):
    def __init__(self, config: dict, run_dir: str, max_requeues: int, spec: EvalSpec):
        super().__init__(config, run_dir, max_requeues)
        self.spec = spec

    def __call__(self):
        result = super().__call__()  # returns only once training finished (preemption exits or requeues)
        if result.status == "finished" and int(os.environ.get("RANK", "0")) == 0:
            from unimlip_train.export import resolve_checkpoint

            evaluate_run(Path(self.run_dir), resolve_checkpoint(self.run_dir), self.spec)
        return result
