"""The gathered negatives' all-gather: the synchronous autograd one that ``losses.gather.all_gather_with_grad``
uses, against torch's functional ``all_gather_single_autograd``, on the same tensors, in the same run.

For each size (the contrastive embeddings: local batch x width, fp32 as the losses gather them) both
implementations gather with gradients and run the backward (a reduce-scatter) of a weighted sum; reports
milliseconds per call (forward + backward, synchronised) and whether values and gradients are bit-equal.
One JSON line from rank 0 (``--out``: also appended to OUT/gpu_suite.jsonl). Needs a process group of two or
more ranks: ``bench/gpu_suite.sh`` starts it on every GPU of the machine when there are two or more.

    torchrun --standalone --nproc_per_node 2 bench/gather_bench.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def functional_gather(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(t, gather_dim=0, group=dist.group.WORLD)


def timed(gather, x: torch.Tensor, weights: torch.Tensor, iters: int, warmup: int) -> tuple:
    """ms per forward + backward, and the last call's (values, gradient)."""
    for i in range(warmup + iters):
        if i == warmup:
            if x.is_cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
        leaf = x.detach().requires_grad_()
        out = gather(leaf)
        (out * weights).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3, out.detach(), leaf.grad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="local batch (rows per rank)")
    p.add_argument("--widths", default="256,512,2048", help="embedding widths to gather")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", help="append the JSON line to OUT/gpu_suite.jsonl")
    args = p.parse_args(argv)
    from unimlip_train.losses.gather import all_gather_with_grad

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.rows, width, generator=torch.Generator().manual_seed(rank)).to(device)
        weights = torch.randn(args.rows * world, width, generator=torch.Generator().manual_seed(7)).to(device)
        sync_ms, sync_out, sync_grad = timed(all_gather_with_grad, x, weights, args.iters, args.warmup)
        func_ms, func_out, func_grad = timed(functional_gather, x, weights, args.iters, args.warmup)
        rows.append({"shape": [args.rows, width], "sync_autograd_ms": round(sync_ms, 4),
                     "functional_ms": round(func_ms, 4), "functional_over_sync": round(func_ms / sync_ms, 4),
                     "values_equal": bool(torch.equal(sync_out, func_out)),
                     "grads_equal": bool(torch.equal(sync_grad, func_grad))})
    if rank == 0:
        record = {"case": "gather", "backend": dist.get_backend(), "world_size": world, "iters": args.iters,
                  "results": rows}
        print(json.dumps(record), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "gpu_suite.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
