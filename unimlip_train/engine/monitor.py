"""Training telemetry: TensorBoard scalars, ``metrics.jsonl`` and a console progress line (rank 0 only).

TensorBoard is what users watch; metrics.jsonl is what scripts and tests read (one JSON object per logged
step, loss terms under their config names).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional


# Logged scalars that are not loss terms (kept out of the console's term list).
_NOT_TERMS = {"loss", "temperature", "grad_norm", "samples_per_s", "samples_per_s_per_gpu", "data_wait_frac",
              "skipped_steps", "samples_seen", "gpu_mem_gib"}


def _drop_lines_from(path: str, step: int) -> None:
    """Like TensorBoard's ``purge_step``: a resumed run rewrites the steps a killed run logged past its last
    checkpoint, so those lines go (atomically: a temp file, then a rename)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) < step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Monitor:
    """Writes nothing on ranks other than 0, so every rank can call it unconditionally."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
            path = os.path.join(run_dir, "metrics.jsonl")
            if purge_step is not None:
                _drop_lines_from(path, purge_step)
            self._jsonl = open(path, "a", encoding="utf-8")

    def log_train(self, step: int, scalars: dict[str, float], start_step: int = 0) -> None:
        """``scalars``: flat names such as ``loss``, ``itc``, ``lr/image``, ``samples_per_s``."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._writer.add_scalar(f"train/{k}", v, step)
        self._writer.flush()
        self._write_jsonl({"split": "train", "step": step, **scalars})
        done = step - start_step
        eta = (time.time() - self.start) / max(1, done) * (self.total_steps - step)
        terms = " ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k not in _NOT_TERMS and "/" not in k)
        print(f"step {step}/{self.total_steps} loss {scalars['loss']:.4f} ({terms}) "
              f"T {scalars.get('temperature', float('nan')):.4f} lr {scalars.get('lr/head', 0.0):.2e} "
              f"gnorm {scalars.get('grad_norm', float('nan')):.3f} "
              f"{scalars.get('samples_per_s', 0.0):.1f} samples/s data-wait {100 * scalars.get('data_wait_frac', 0):.0f}% "
              f"eta {eta / 60:.1f} min", flush=True)

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._writer.add_scalar(f"val/{k}", v, step)
        self._writer.flush()
        self._write_jsonl({"split": "val", "step": step, **metrics})
        print(f"val step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    def event(self, message: str) -> None:
        """A one-off message (skipped step, resume, checkpoint) on the console of rank 0."""
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def _write_jsonl(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = self._jsonl = None


def gpu_memory_gib() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30
