"""What the loss-spike guard costs per step: the loss read one step late through pinned memory and the running
median (``unimlip_train.engine.health.guard``), against the same training loop without it, in the same run.

Three loops over one model (an MLP, AdamW), interleaved in blocks so that machine noise hits all alike:
``baseline`` keeps the loss on the device; ``guard`` adds exactly the trainer's per-step guard work (``LossReader``
add / step_done / take, ``SpikeDetector.update``); ``item`` reads ``loss.item()`` every step instead, the naive way,
which makes the host wait for the device each step. Reports ms per step (median over blocks), the ratios to the
baseline, and the guard's host work alone in microseconds per step. One JSON line (``--out``: also appended to
OUT/gpu_suite.jsonl). On CPU every loop is synchronous anyway; the ratios that matter come from a GPU.

    python bench/health_overhead.py [--device cuda] [--width 4096] [--depth 8] [--batch 256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from unimlip_train.engine.health.guard import LossReader  # noqa: E402
from unimlip_train.engine.health.spike import SpikeDetector  # noqa: E402


def build(width: int, depth: int, device: torch.device):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run_block(kind: str, model, opt, x: torch.Tensor, steps: int, step0: int) -> float:
    """Seconds per step of ``steps`` training steps of the given kind (synchronised at both ends)."""
    reader, detector = LossReader(x.device), SpikeDetector(10.0, 50, 3)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "guard":
            reader.add(loss, 1)
            reader.step_done(step0 + i)
            step, value = reader.take()
            if step >= 0:
                detector.update(step, value)
        elif kind == "item":
            detector.update(step0 + i, loss.item())
    sync()
    return (time.perf_counter() - t) / steps


def guard_host_us(device: torch.device, steps: int) -> float:
    """Microseconds per step of the guard's own work on a ready loss (no training step around it)."""
    reader, detector = LossReader(device), SpikeDetector(10.0, 50, 3)
    loss = torch.tensor(1.0, device=device)
    t = time.perf_counter()
    for i in range(steps):
        reader.add(loss, 1)
        reader.step_done(i)
        step, value = reader.take()
        if step >= 0:
            detector.update(step, value)
    return (time.perf_counter() - t) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=0, help="MLP width (default 4096 on GPU, 512 on CPU)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=0, help="batch (default 256 on GPU, 64 on CPU)")
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--blocks", type=int, default=5, help="blocks per loop")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the GPU suite's CPU smoke)")
    p.add_argument("--out", default="", help="also append the JSON line to OUT/gpu_suite.jsonl")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    width = args.width or (4096 if gpu else 512)
    batch = args.batch or (256 if gpu else 64)
    steps, blocks = (5, 2) if args.smoke else (args.steps, args.blocks)
    if args.smoke:
        width, batch = 64, 8
    torch.manual_seed(0)
    model, opt = build(width, args.depth, device)
    x = torch.randn(batch, width, device=device)
    run_block("baseline", model, opt, x, steps, 0)  # warm-up: allocator, kernels, Adam state
    times = {"baseline": [], "guard": [], "item": []}
    for b in range(blocks):
        for kind in times:
            times[kind].append(run_block(kind, model, opt, x, steps, b * steps))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    line = {"case": "health_overhead", "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if gpu else None, "width": width, "depth": args.depth,
            "batch": batch, "steps_per_block": steps, "blocks": blocks,
            "ms_per_step": {k: round(v, 4) for k, v in ms.items()},
            "guard_over_baseline": round(ms["guard"] / ms["baseline"], 4),
            "item_over_baseline": round(ms["item"] / ms["baseline"], 4),
            "guard_host_us_per_step": round(guard_host_us(device, 2000 if not args.smoke else 20), 2)}
    print(json.dumps(line))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "gpu_suite.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
