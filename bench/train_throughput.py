"""Training throughput of the engine beside a minimal plain-PyTorch CLIP step with the same towers.

Reports samples/s, the step time split (data wait / forward / backward / optimizer), peak memory and model
FLOP utilisation (FLOPs from ``torch.utils.flop_counter.FlopCounterMode``; peak = ``--peak-tflops`` on GPU,
or a dense matmul measured in this run on CPU). Both measurements run in the same process, so the ratio
between them is meaningful on a noisy machine.

    python bench/train_throughput.py --config configs/tiny_cpu.yaml data.train=demo_out/shards/index.json
    python bench/train_throughput.py --config configs/vitb16_biomedbert.yaml --data synthetic \\
        model.text.name= "model.text.config={}" train.micro_batch_size=256      # GPU: ViT-B/16 + BERT-base
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    """GPU: peak allocated; CPU: the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured_peak_flops(dtype: torch.dtype) -> float:
    """A large square matmul's FLOP/s on this device: the denominator of MFU where no spec sheet applies."""
    n = 1024 if not torch.cuda.is_available() else 8192
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    sync()
    t, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    sync()
    return reps * 2 * n**3 / (time.perf_counter() - t)


def synthetic_batch(cfg, tokenizer, needs, device) -> dict:
    """Random tensors with the batch seam's shapes (no data loading)."""
    b, length, size = cfg.train.micro_batch_size, cfg.data.text.max_length, cfg.data.image_size
    ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (b, length))
    ids[:, 0] = tokenizer.cls_token_id or 0
    mask = torch.ones(b, length, dtype=torch.long)
    batch = {"image": torch.randn(b, cfg.data.in_chans, size, size), "input_ids": ids, "attention_mask": mask,
             "key": [str(i) for i in range(b)], "report_id": torch.arange(b), "group_id": torch.arange(b),
             "label_id": torch.arange(b)}
    if needs.image_view2:
        batch["image_view2"] = torch.randn_like(batch["image"])
    if needs.text_view2:
        batch["text_view2_ids"], batch["text_view2_mask"] = ids.clone(), mask.clone()
    if needs.mlm:
        labels = torch.full_like(ids, -100)
        labels[:, 1::7] = ids[:, 1::7]
        batch["mlm_input_ids"], batch["mlm_labels"] = ids.clone(), labels
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def count_flops(fn) -> int:
    """FLOPs of ``fn()``. On CPU attention runs through the math backend while counting: the CPU's fused SDPA
    kernel is not in the counter's registry and would count as zero (CUDA's flash / efficient kernels are)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    math_attention = sdpa_kernel(SDPBackend.MATH) if not torch.cuda.is_available() else contextlib.nullcontext()
    with math_attention, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pinned(batch: dict) -> dict:
    """The batch in page-locked host memory on CUDA (what the loader's ``pin_memory`` yields), so the
    trainer's non-blocking copies are asynchronous."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def bench_engine(cfg, tokenizer, args, device, dtype, name: str, flops: Optional[int] = None) -> dict:
    """Our path: the real ``Trainer.train_step`` (every enabled term, the DeepSpeed engine, accumulation as
    configured), fed by the real stream or by one fixed synthetic batch (pinned on CUDA, as the loader's).
    ``flops`` of one step: counted here on a first step when not given (a compiled step cannot be counted)."""
    import itertools
    import tempfile

    from unimlip_train.data.collate import batch_needs
    from unimlip_train.engine.trainer import Trainer

    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="unimlip-bench-"), resume="none")
    trainer.start()
    if args.data == "synthetic":
        trainer.batches = itertools.repeat(pinned(synthetic_batch(cfg, tokenizer, batch_needs(cfg.loss), "cpu")))
    if flops is None:
        flops = count_flops(trainer.train_step)
    split = dict(data=0.0, compute=0.0)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            split = dict.fromkeys(split, 0.0)
            trainer.window.wait = 0.0
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        split["compute"] += time.perf_counter() - t0
    split["data"] = trainer.window.wait
    split["compute"] -= split["data"]
    trainer.batches = None  # stops the loader's workers
    trainer.monitor.close()
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum
    return _result(name, samples, args, split, flops)


def bench_plain_clip(cfg, tokenizer, args, device, dtype) -> dict:
    """Baseline: the same towers and projections, symmetric InfoNCE only, torch AdamW, autocast."""
    from unimlip_train.data.collate import BatchNeeds
    from unimlip_train.models.build import build_model

    model = build_model(cfg, tokenizer).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            fused=torch.cuda.is_available() or None)
    batch = synthetic_batch(cfg, tokenizer, BatchNeeds(), device)
    dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = lambda: torch.autocast(dev_type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    def forward():
        with autocast():
            img = model.encode_image(batch["image"])
            txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
            logits = model.logit_scale.exp() * img.float() @ txt.float().T
        labels = torch.arange(len(logits), device=device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    flops = count_flops(lambda: forward().backward())
    opt.zero_grad(set_to_none=True)
    split = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            split = dict.fromkeys(split, 0.0)
        t1 = time.perf_counter()
        loss = forward()
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        for k, dt in zip(("forward", "backward", "optimizer"), (t2 - t1, t3 - t2, t4 - t3)):
            split[k] += dt
    return _result("plain PyTorch CLIP step (same towers)", cfg.train.micro_batch_size, args, split, flops)


def _result(name, b, args, split, flops) -> dict:
    """``b``: samples per timed step; ``flops``: of one step."""
    step_s = sum(split.values()) / args.steps
    return {"name": name, "batch": b, "samples_per_s": round(b / step_s, 2), "step_ms": round(step_s * 1e3, 2),
            **{f"{k}_ms": round(v / args.steps * 1e3, 2) for k, v in split.items()},
            "data_wait_frac": round(split.get("data", 0.0) / args.steps / step_s, 4),
            "gflop_per_sample": round(flops / b / 1e9, 3), "achieved_tflops": round(flops / step_s / 1e12, 4),
            "peak_mem_gib": round(peak_memory_gib(), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", choices=("stream", "synthetic"), default="stream",
                   help="engine input: the real training stream (data wait measured) or random tensors")
    p.add_argument("--compare-negatives", type=int, default=0, metavar="K",
                   help="instead: the engine at train.grad_accum=K with train.negatives=micro vs accumulated "
                        "(the cost of the extra embedding pass that makes every micro batch's negatives span the "
                        "whole optimizer step)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="GPU dense peak for MFU (default: H100/H200 SXM bf16 989); CPU measures its own")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    from unimlip_train.cli.args import parse_with_overrides

    args = parse_with_overrides(p, argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import unimlip_train.distributed.process_group as du
    from unimlip_train.config.load import load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.models.pretrained import resolve_towers

    cfg = load_config(args.config, args.overrides, resolve=resolve_towers)
    du.init_distributed(cfg.deepspeed.backend)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    peak = args.peak_tflops * 1e12 if torch.cuda.is_available() else measured_peak_flops(torch.float32)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.text.name)
    torch.manual_seed(cfg.seed)
    if args.compare_negatives:
        results = []
        for negatives in ("micro", "accumulated"):
            k_cfg = load_config(args.config, [*args.overrides, f"train.grad_accum={args.compare_negatives}",
                                              f"train.negatives={negatives}"], resolve=resolve_towers)
            results.append(bench_engine(k_cfg, tokenizer, args, device, dtype,
                                        f"engine, K={args.compare_negatives}, negatives={negatives}"))
        baseline, what = "micro", "accumulated / micro"
    else:
        results = [bench_plain_clip(cfg, tokenizer, args, device, dtype),
                   bench_engine(cfg, tokenizer, args, device, dtype, "engine (all enabled terms, DeepSpeed)")]
        baseline, what = "plain", "engine / plain CLIP"
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; MFU denominator {peak / 1e12:.3f} TFLOP/s "
          f"({'spec' if torch.cuda.is_available() else 'measured fp32 matmul'})")
    print(f"{'':44s} {'samples/s':>10s} {'data ms':>8s} {'compute':>8s} {'GFLOP/smp':>9s} {'MFU':>6s} {'peak GiB':>8s}")
    for r in results:
        r["mfu"] = round(r["achieved_tflops"] * 1e12 / peak, 4)
        print(f"{r['name']:44s} {r['samples_per_s']:10.1f} {r['data_ms']:8.1f} "
              f"{r['step_ms'] - r['data_ms']:8.1f} "
              f"{r['gflop_per_sample']:9.3f} {r['mfu']:6.3f} {r['peak_mem_gib']:8.2f}")
    ratio = results[1]["samples_per_s"] / results[0]["samples_per_s"]
    print(f"{what} samples/s: {ratio:.3f}")
    for r in results:
        print(json.dumps({"device": device_name, **r}))
    print(json.dumps({f"samples_per_s_over_{baseline}": round(ratio, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
