"""The GPU suite's throughput cases, in one process, each a JSON line (``bench/gpu_suite.sh`` runs this).

Cases, in this order, each ``--warmup`` steps then ``--steps`` timed steps, bf16, batch 256 per GPU:
  open_clip      open_clip's ViT-B-16 model step (its own towers and ClipLoss, AMP bf16, fused AdamW): the baseline
  clip_eager     CLIP-only objective, ViT-B/16 + BERT-base, through the real ``Trainer.train_step`` (DeepSpeed
                 ZeRO-2, the production config), one synthetic batch in pinned memory
  full_eager     the same with every Uni-Mlip term on
  full_loader    full_eager fed by the real loader (``--workers`` processes) from shards of synthetic 512-px
                 images written on the spot
  clip_compiled  / full_compiled: ``train.compile=true`` (the towers through ``torch.compile``); last, because
                 their compile time is the least predictable part of a short GPU window
Every line has samples/s, MFU (FLOPs counted by torch's flop counter on an eager step, over ``--peak-tflops``),
peak GiB, data_wait_frac and the goal ratios of issue 12; a last line ``goals`` lists each goal with its
value and whether it was met (``met`` null under ``--smoke``, whose tiny sizes cannot judge them). Cases past
``--budget-s`` are skipped with a line that says so.

``--smoke``: the same cases at tiny sizes on CPU, one timed step each (a 2-layer ViT at 32 px, a 2-layer BERT,
batch 8, 2 loader workers, fp32: a CPU has no fast bf16 matmul), the compiled cases with
``train.compile_backend=aot_eager`` (graph capture without code generation: inductor's C++ build alone takes
minutes on a small CPU; tests/test_gpu.py trains with inductor on CPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from production_sizes import CLIP_ONLY, PRODUCTION_CONFIG, production_overrides, write_bert_sized_tokenizer  # noqa: E402
from train_throughput import bench_engine, count_flops, measured_peak_flops, peak_memory_gib, sync  # noqa: E402

#: issue 12's goals: (name, comparison, target)
GOALS = (("clip_samples_per_s_over_open_clip", ">=", 1.3), ("clip_mfu", ">=", 0.45),
         ("full_mfu_over_clip_mfu", ">=", 0.9), ("full_flops_over_clip_flops", "<=", 3.0),
         ("loader_data_wait_frac", "<=", 0.05))

SMOKE_OVERRIDES = [
    "model.image.name=vit_tiny_patch16_224", "model.image.pretrained=", "model.image.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
    "model.text.name=", "model.text.config={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 128, max_position_embeddings: 64}", "model.embed_dim=32", "model.ssl_embed_dim=32",
    "model.fusion={layers: 1, heads: 2}", "data.image_size=32", "data.shuffle_buffer=16", "data.val=",
    "train.eval_every=0", "train.checkpoint_every=0",
    "deepspeed.precision=fp32"]


class Suite:
    """Runs the cases in order, writes each result line as soon as it exists, keeps the time budget."""

    def __init__(self, args):
        self.args, self.t0, self.results, self.errors = args, time.time(), {}, []
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "gpu_suite.jsonl", "a", encoding="utf-8")
        self.work = Path(tempfile.mkdtemp(prefix="unimlip-gpu-suite-"))
        self.peak = args.peak_tflops * 1e12 if self.cuda else measured_peak_flops(torch.float32)
        if args.smoke:
            self.tokenizer_dir, self.overrides = "", [*SMOKE_OVERRIDES, f"train.micro_batch_size={args.batch}",
                                                      f"data.text.max_length={args.text_length}"]
        else:
            self.tokenizer_dir = write_bert_sized_tokenizer(self.work / "tokenizer")
            self.overrides = production_overrides(self.tokenizer_dir, args.text_length, args.batch)
        self.shards = self.write_shards()
        self.overrides += [f"data.train={self.shards}", "data.num_workers=0",
                           f"train.compile_backend={args.compile_backend}"]

    def emit(self, record: dict) -> None:
        record = {"elapsed_s": round(time.time() - self.t0, 1), **record}
        print(json.dumps(record), flush=True)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def write_shards(self) -> str:
        """Synthetic radiographs (``--image-px`` px JPEG) and reports, as real shards: enough for every
        loader worker to fill a micro batch each epoch."""
        a = self.args
        n = a.workers * a.batch + a.batch // 2
        out = self.work / "shards"
        t = time.time()
        subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", str(n), "--image-size",
                        str(a.image_px), "--val-fraction", "0", "--shard-size", str(max(a.batch, 16)), "--out",
                        str(out), "--workers", str(min(16, os.cpu_count() or 1)), "--no-audit", "--no-progress"],
                       check=True, cwd=REPO)
        print(f"wrote {n} synthetic {a.image_px}-px samples in {time.time() - t:.1f} s", flush=True)
        return str(out / "index.json")

    def config(self, *extra: str):
        from unimlip_train.config.load import load_config
        from unimlip_train.models.pretrained import resolve_towers

        return load_config(PRODUCTION_CONFIG, [*self.overrides, *extra], resolve=resolve_towers)

    def run(self, name: str, fn) -> dict | None:
        """One case: skipped past the budget, reported (not fatal) when it fails."""
        if time.time() - self.t0 > self.args.budget_s:
            self.emit({"case": name, "skipped": f"time budget of {self.args.budget_s} s spent"})
            return None
        torch.manual_seed(0)
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  one broken case must not cost the rest of a scarce GPU window
            self.errors.append(name)
            traceback.print_exc()  # into the suite's log: the GPU window may be the only one
            self.emit({"case": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            if self.args.fail_fast:
                raise
            return None
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        result = {"case": name, "wall_s": round(time.time() - t, 1), **result}
        result["mfu"] = round(result["gflop_per_sample"] * 1e9 * result["samples_per_s"] / self.peak, 4)
        if self.cuda:  # what the case left allocated: a leak here would crowd out the next case
            result["gpu_mem_after_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        self.results[name] = result
        self.ratios()  # a case's ratios refer only to cases run before it
        self.emit(result)
        return result

    # ------------------------------------------------------------------------------------------ cases
    def open_clip_step(self) -> dict:
        """open_clip's model step as its trainer runs it: forward under AMP bf16, ClipLoss, backward, AdamW,
        logit-scale clamp; the batch already on the device."""
        import math

        import open_clip
        from open_clip.loss import ClipLoss

        a = self.args
        if a.smoke:
            model = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(
                layers=2, width=64, head_width=32, patch_size=8, image_size=32), text_cfg=open_clip.CLIPTextCfg(
                context_length=16, vocab_size=1000, width=64, heads=2, layers=2), output_dict=True)
        else:
            model = open_clip.create_model("ViT-B-16", pretrained=None, output_dict=True)
        model = model.to(self.device).train()
        size, context = model.visual.image_size, model.context_length
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = torch.randn(a.batch, 3, size, size, device=self.device)
        texts = torch.randint(0, model.vocab_size, (a.batch, context), device=self.device)
        loss_fn = ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.cuda or None)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                out = model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))

        flops = count_flops(step)
        for _ in range(a.warmup):
            step()
        sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        step_s = (time.perf_counter() - t) / a.steps
        return {"name": "open_clip ViT-B-16 model step", "batch": a.batch, "text_length": context,
                "samples_per_s": round(a.batch / step_s, 2), "step_ms": round(step_s * 1e3, 2), "data_wait_frac": 0.0,
                "gflop_per_sample": round(flops / a.batch / 1e9, 3), "achieved_tflops": round(flops / step_s / 1e12, 4),
                "peak_mem_gib": round(peak_memory_gib(), 3)}

    def engine(self, name: str, objective: list, compiled: bool, data: str = "synthetic", flops=None) -> dict:
        cfg = self.config(*objective, f"train.compile={str(compiled).lower()}",
                          *([f"data.num_workers={self.args.workers}"] if data == "stream" else []))
        from unimlip_train.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer)
        warmup = max(self.args.warmup, 1 if compiled else 0)  # the compiling step is never timed
        bench_args = argparse.Namespace(steps=self.args.steps, warmup=warmup, data=data)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
        result = bench_engine(cfg, tokenizer, bench_args, self.device, dtype, name, flops=flops)
        return {**result, "text_length": cfg.data.text.max_length, "compiled": compiled,
                "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision}

    def flops_of(self, case: str):
        """FLOPs per step of an eager case (a compiled step runs the same arithmetic)."""
        r = self.results.get(case)
        return None if r is None else round(r["gflop_per_sample"] * 1e9 * r["batch"])

    # ----------------------------------------------------------------------------------------- ratios
    def ratios(self) -> None:
        """Each goal's ratio onto the line it belongs to; the goals line from the best mode measured."""
        r = self.results
        base = r.get("open_clip")
        for mode in ("eager", "compiled"):
            clip, full = r.get(f"clip_{mode}"), r.get(f"full_{mode}")
            if clip and base:
                clip["samples_per_s_over_open_clip"] = round(clip["samples_per_s"] / base["samples_per_s"], 4)
            if clip and full and clip["mfu"] > 0:
                full["mfu_over_clip_mfu"] = round(full["mfu"] / clip["mfu"], 4)
                full["flops_over_clip_flops"] = round(full["gflop_per_sample"] / clip["gflop_per_sample"], 4)
                full["step_time_over_clip"] = round(full["step_ms"] / clip["step_ms"], 4)
        loader, synthetic = r.get("full_loader"), r.get("full_eager")
        if loader and synthetic:
            loader["samples_per_s_over_synthetic"] = round(loader["samples_per_s"] / synthetic["samples_per_s"], 4)

    def goals(self) -> dict:
        r = self.results
        clips = [c for c in (r.get("clip_eager"), r.get("clip_compiled")) if c]
        best_clip = max(clips, key=lambda c: c["samples_per_s"], default=None)
        fulls = [f for f in (r.get("full_eager"), r.get("full_compiled")) if f and "mfu_over_clip_mfu" in f]
        best_full = max(fulls, key=lambda f: f["samples_per_s"], default=None)
        values = {
            "clip_samples_per_s_over_open_clip": best_clip and best_clip.get("samples_per_s_over_open_clip"),
            "clip_mfu": best_clip and best_clip["mfu"],
            "full_mfu_over_clip_mfu": best_full and best_full["mfu_over_clip_mfu"],
            "full_flops_over_clip_flops": best_full and best_full["flops_over_clip_flops"],
            "loader_data_wait_frac": r.get("full_loader") and r["full_loader"]["data_wait_frac"],
        }
        goals = {}
        for key, op, target in GOALS:
            value = values[key]
            # --smoke: tiny towers whose ratios say nothing about issue 12's ViT-B/16 + BERT-base goals
            met = None if value is None or self.args.smoke else (value >= target if op == ">=" else value <= target)
            goals[key] = {"value": value, "target": f"{op} {target}", "met": met}
        return {"case": "goals", "smoke": self.args.smoke, "goals": goals,
                "modes": {"clip": best_clip and ("compiled" if best_clip["compiled"] else "eager"),
                          "full": best_full and ("compiled" if best_full["compiled"] else "eager")}}

    def main(self) -> int:
        a = self.args
        device = torch.cuda.get_device_name() if self.cuda else f"CPU ({torch.get_num_threads()} threads)"
        self.emit({"case": "header", "device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                   "smoke": a.smoke, "batch": a.batch, "text_length": a.text_length, "steps": a.steps,
                   "warmup": a.warmup, "mfu_denominator_tflops": round(self.peak / 1e12, 3),
                   "bf16_matmul_tflops": round(measured_peak_flops(torch.bfloat16) / 1e12, 1) if self.cuda else None})
        wanted = a.cases.split(",")
        cases = [
            ("open_clip", self.open_clip_step),
            ("clip_eager", lambda: self.engine("CLIP-only, eager", CLIP_ONLY, False)),
            ("full_eager", lambda: self.engine("full Uni-Mlip, eager", [], False)),
            ("full_loader", lambda: self.engine(f"full Uni-Mlip, eager, real loader ({a.workers} workers)", [],
                                                False, data="stream", flops=self.flops_of("full_eager"))),
            ("clip_compiled", lambda: self.engine("CLIP-only, compiled", CLIP_ONLY, True,
                                                  flops=self.flops_of("clip_eager"))),
            ("full_compiled", lambda: self.engine("full Uni-Mlip, compiled", [], True,
                                                  flops=self.flops_of("full_eager"))),
        ]
        for name, fn in cases:
            if name in wanted:
                self.run(name, fn)
        self.emit(self.goals())
        shutil.rmtree(self.work, ignore_errors=True)
        return 1 if self.errors else 0  # a case skipped for time is reported, not a failure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results/latest",
                   help="folder for gpu_suite.jsonl (default: $OUT, else bench/results/latest)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI)")
    p.add_argument("--cases", default="open_clip,clip_eager,full_eager,full_loader,clip_compiled,full_compiled",
                   help="which cases to run (comma-separated; they run in the order above)")
    p.add_argument("--steps", type=int, help="timed steps per case (default 30; smoke 1)")
    p.add_argument("--warmup", type=int, help="untimed steps first, besides the FLOP-counting one (default 5; "
                                              "smoke 0; compiled cases at least 1)")
    p.add_argument("--batch", type=int, help="micro batch per GPU (default 256; smoke 8)")
    p.add_argument("--text-length", type=int,
                   help="report tokens (default 77, open_clip's context, so samples/s compare like for like; "
                        "the production config's is 128; smoke 16)")
    p.add_argument("--workers", type=int, help="loader processes of the loader case (default 12; smoke 2)")
    p.add_argument("--image-px", type=int, help="side of the synthetic shard images (default 512; smoke 64)")
    p.add_argument("--compile-backend", help="train.compile_backend of the compiled cases (default inductor; "
                                             "smoke aot_eager)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="GPU dense bf16 peak for MFU (default: H100/H200 SXM 989); CPU measures its own")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the cases that would start after this")
    p.add_argument("--fail-fast", action="store_true", help="raise on the first failing case")
    args = p.parse_args(argv)
    defaults = dict(steps=(1, 30), warmup=(0, 5), batch=(8, 256), text_length=(16, 77), workers=(2, 12),
                    image_px=(64, 512), compile_backend=("aot_eager", "inductor"))
    for key, (smoke, gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else gpu)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or --smoke for the CPU check")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
