"""Several trainings in one launch (torchrun, or plain python for one rank), each resuming from a checkpoint of
another layout; optionally saving a checkpoint right after the resume, before any step (what the engine and the
stream hold after the reshard, and the first half of a reshard round trip).

Usage: torchrun --standalone --nproc_per_node N tests/elastic_worker.py JOBS_JSON
JOBS_JSON: a list of {"config", "run_dir", "resume", "overrides": [...], "save_first": bool}.
"""
import json
import sys

import torch.distributed as dist

from unimlip_train.config.load import load_config
from unimlip_train.engine.trainer import Trainer

if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        trainer = Trainer(load_config(job["config"], job["overrides"]), job["run_dir"], resume=job["resume"])
        if job.get("save_first"):
            trainer.manager.save(trainer.engine, trainer.state, trainer.stream, trainer.cfg, trainer.tokenizer)
        result = trainer.run()
        assert result.status == "finished", result
    dist.destroy_process_group()
