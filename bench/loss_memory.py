"""Loss memory and time of gathered-negative InfoNCE: local rows (what one rank computes) vs the full matrix.

With W ranks of local batch n (global N = W n), the open_clip scheme has each rank compute its n x N rows
of the logit matrix (both directions) instead of the N x N matrix. This bench runs the library's
``contrastive_loss`` forward + backward both ways in the same run:

* local rows: rank 0 of W simulated ranks (the gather is replaced by a concatenation in which only the
  local slice carries gradients, exactly what each rank holds after the autograd all-gather);
* full matrix: the same function on the whole global batch in one process.

Memory measured: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs; on CPU, the peak resident
set (VmHWM, reset through /proc/self/clear_refs) above the resident set before the loss, each variant in
a fresh child process so the allocator's cache of one does not hide the other. The local figure includes
the gathered N x dim embeddings and their gradients, which a real rank holds too. The analytic size of the
logit matrices plus their gradients (fp32) is printed as well.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import unimlip_train.losses.contrastive as contrastive


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=8, help="simulated ranks W")
    p.add_argument("--local-batch", type=int, default=512, help="per-rank batch n")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--reps", type=int, default=3, help="timed forward+backward repetitions per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", choices=["local", "full"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    total = args.ranks * args.local_batch
    a = F.normalize(torch.randn(total, args.dim, generator=g), dim=-1).to(args.device)
    b = F.normalize(torch.randn(total, args.dim, generator=g), dim=-1).to(args.device)
    return a, b, torch.tensor([14.3], device=args.device)


def run_variant(variant: str, args: argparse.Namespace, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """One forward + backward; returns the loss."""
    n = args.local_batch
    if variant == "full":
        a_in, b_in = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = contrastive.contrastive_loss(a_in, b_in, scale)
    else:
        a_in, b_in = a[:n].clone().requires_grad_(), b[:n].clone().requires_grad_()
        others = {id(a_in): a[n:], id(b_in): b[n:]}
        saved = contrastive.world, contrastive.all_gather_with_grad
        contrastive.world = lambda: (0, args.ranks)
        contrastive.all_gather_with_grad = lambda t: torch.cat([t, others[id(t)]])
        try:
            loss = contrastive.contrastive_loss(a_in, b_in, scale)
        finally:
            contrastive.world, contrastive.all_gather_with_grad = saved
    loss.backward()
    return loss.item()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(variant: str, args: argparse.Namespace) -> int:
    """Peak bytes above the inputs for one forward + backward of ``variant``."""
    tiny = argparse.Namespace(**{**vars(args), "local_batch": 4})
    run_variant(variant, tiny, *inputs(tiny))  # page in code, thread pools and allocator arenas first
    a, b, scale = inputs(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(variant, args, a, b, scale)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    run_variant(variant, args, a, b, scale)
    return (_status_kb("VmHWM") - base) * 1024


def child_memory(variant: str, args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):
        return measure_memory(variant, args)
    cmd = [sys.executable, __file__, "--child", variant, "--ranks", str(args.ranks), "--local-batch",
           str(args.local_batch), "--dim", str(args.dim), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def time_variant(variant: str, args: argparse.Namespace, a, b, scale) -> tuple[float, float]:
    run_variant(variant, args, a, b, scale)  # warm-up
    times = []
    for _ in range(args.reps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = run_variant(variant, args, a, b, scale)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], loss


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps({"peak_bytes": measure_memory(args.child, args)}))
        return
    n, total = args.local_batch, args.ranks * args.local_batch
    a, b, scale = inputs(args)
    what = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM) delta, fresh process"
    print(f"InfoNCE forward+backward, {args.ranks} ranks x {n} = {total} global, dim {args.dim}, {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"memory measured as: {what}")
    rows = {}
    for variant, shape in (("local", (n, total)), ("full", (total, total))):
        analytic = 2 * 2 * shape[0] * shape[1] * 4  # two directions x (logits + their gradient), fp32
        # the printed loss of "local" is rank 0's share only; the mean over ranks equals the full loss
        seconds, loss = time_variant(variant, args, a, b, scale)
        rows[variant] = (child_memory(variant, args), analytic, seconds, loss)
        print(f"{variant:>5} rows {shape[0]:>6} x {shape[1]:<6} peak {rows[variant][0] / 2**20:9.1f} MiB  "
              f"logits+grads {analytic / 2**20:9.1f} MiB  median {seconds * 1000:9.1f} ms  loss {loss:.4f}")
    (lm, la, lt, _), (fm, fa, ft, _) = rows["local"], rows["full"]
    print(f"ratio full/local: measured memory {fm / max(lm, 1):.1f}x, analytic {fa / la:.1f}x, time {ft / lt:.1f}x "
          f"(ideal {args.ranks}x for memory and compute)")


if __name__ == "__main__":
    main()
