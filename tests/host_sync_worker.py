"""Counts the host reads of device values (``.item()``, ``.cpu()``, ``.tolist()``, ``bool()``/``float()``) that
the project's own code makes while training, by training step phase.

Usage: python tests/host_sync_worker.py OUT.json CONFIG [overrides...]
Each read whose caller is a file of ``unimlip_train`` is attributed to the innermost trainer step on the stack
(``train_step``, ``log_step``, ...); reads by DeepSpeed or torch themselves are not ours and not counted.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

import unimlip_train
from unimlip_train.config.load import load_config
from unimlip_train.engine.trainer import Trainer

PACKAGE = str(Path(unimlip_train.__file__).parent)
# LossReader.take: the loss-spike guard's one read per step, of the loss copied to pinned memory a step before
PHASES = ("train_step", "log_step", "picture_step", "evaluate_step", "checkpoint_step", "build", "resume", "take")
counts: Counter = Counter()


def counting(name: str, original):
    def read(self, *args, **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(PACKAGE):
            phase = "other"
            while frame is not None:
                if frame.f_code.co_name in PHASES:
                    phase = frame.f_code.co_name
                    break
                frame = frame.f_back
            counts[phase] += 1
        return original(self, *args, **kwargs)
    return read


for method in ("item", "cpu", "tolist", "__bool__", "__float__"):
    setattr(torch.Tensor, method, counting(method, getattr(torch.Tensor, method)))

if __name__ == "__main__":
    out, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, cfg.run_dir, resume="none")
    counts.clear()  # building and resuming read what they like, once
    trainer.run()
    Path(out).write_text(json.dumps(counts))
