"""GPU-ready by construction: the training loop reads device values on the host only at the logging cadence.

On a GPU every such read (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``) waits for the device queue to
drain; one per micro batch (a finiteness check, a logged term) keeps the GPU idle between steps. Counted here on
CPU, where the same code runs: a single-process run with every Uni-Mlip term on, accumulated negatives over 2
micro batches, ZeRO-1, logging every 3 steps. The one read per step that is allowed: the loss-spike guard's, of
a step's loss that was copied into pinned memory without blocking a step before (``LossReader.take``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_device_values_are_read_once_per_logging_step(tmp_path):
    subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "72", "--image-size", "32",
                    "--max-size", "32", "--val-fraction", "0.1", "--out", str(tmp_path / "shards"), "--workers", "1",
                    "--no-progress"], check=True, capture_output=True, timeout=300)
    steps, log_every = 6, 3
    overrides = [f"data.train={tmp_path / 'shards' / 'index.json'}", "data.val=", "data.image_size=32",
                 "data.num_workers=0", f"train.steps={steps}", f"train.log_every={log_every}",
                 "train.micro_batch_size=4", "train.grad_accum=2", "train.checkpoint_every=0",
                 f"run_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, str(REPO / "tests" / "host_sync_worker.py"), str(tmp_path / "counts.json"),
                          str(REPO / "configs" / "tiny_cpu.yaml"), *overrides],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())
    print(counts)
    assert counts.get("train_step", 0) == 0, counts  # nothing per micro batch or per optimizer step
    logs = steps // log_every
    assert 1 * logs <= counts.get("log_step", 0) <= 2 * logs, counts  # the summed terms, read once per log
    assert counts.get("picture_step", 0) <= 4, counts  # one picture of the first step's views (image_every=0)
    assert counts.get("other", 0) == 0, counts
    assert counts.get("take", 0) == steps, counts  # one per step, a step late (the last at the final checkpoint)
    # the logged terms are means over each logging window (per step, per micro batch), not sums
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in records if r["split"] == "train"):
        assert record["temperature"] * record["logit_scale"] == pytest.approx(1.0, rel=1e-2), record
