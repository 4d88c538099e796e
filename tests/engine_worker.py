"""Runs several trainings in one torchrun launch (saves the 10-20 s of process start per configuration).

Usage: torchrun --standalone --nproc_per_node 2 tests/engine_worker.py JOBS_JSON
JOBS_JSON: a list of [config_file, run_dir, [overrides...]]; each trains from scratch.
"""
import json
import sys

import torch.distributed as dist

from unimlip_train.config.load import load_config
from unimlip_train.engine.trainer import train
from unimlip_train.eval.validate import validate_with_examples

if __name__ == "__main__":
    for config, run_dir, overrides in json.loads(sys.argv[1]):
        result = train(load_config(config, overrides), run_dir, resume="none", validate=validate_with_examples)
        assert result.status == "finished", result
    dist.destroy_process_group()
