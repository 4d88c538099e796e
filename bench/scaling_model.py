"""Weak scaling on paper: per-step bytes and time of every collective of the full Uni-Mlip step, 8 to 512 GPUs.

The inventory comes from the code: the production model (``configs/vitb16_biomedbert.yaml``, random-init
BERT-base) is built on CPU (exact parameter count), one forward of two samples gives the shapes of every output
the loss terms read, and each enabled term contributes what its implementation moves:

- gathered embeddings (``losses.contrastive``): every contrastive term all-gathers both of its inputs with
  autograd (fp32: the losses run in at least fp32) in forward, a reduce-scatter of the same size in backward;
  ITM all-gathers the image and text embeddings once more, without gradients, to sample hard negatives;
- ITM's exchange (``losses.gather.exchange_rows``): an all-to-all that brings each rank only the token states
  of its sampled negatives (text tokens, their mask, image tokens: ``batch`` rows each), the gradients going back
  the same way; shown beside it, what an all-gather of every rank's token states would move;
- ZeRO-2 (``deepspeed.zero_stage: 2``): the fp32 gradient reduce-scatter (``communication_data_type: fp32``),
  overlapped with the backward except ``--zero-exposed`` of it, and the bf16 parameter all-gather after the
  optimizer step, not overlapped;
- the logits: each rank scores its local rows against the global batch, so their FLOPs and memory grow with
  the number of GPUs (counted as extra compute at the step's MFU).

A collective over N ranks that gathers S bytes in all takes ``alpha * ceil(log2 N) + S (N-1)/N / bandwidth``
(ring bandwidth term, tree-like latency term); the bandwidth is the per-GPU NVLink figure within one node
(N <= ``--gpus-per-node``) and the per-GPU InfiniBand figure across nodes. The all-to-all sends the off-node
share of its rows over InfiniBand while the on-node share uses NVLink. Step compute = measured FLOPs per sample
(``bench/flops_per_sample.py``) x batch / (``--mfu`` x ``--peak-tflops``). Weak-scaling efficiency = the
one-GPU step time over the N-GPU step time (compute + exposed communication + the logits' extra compute).

    python bench/scaling_model.py                           # the README table (markdown)
    python bench/scaling_model.py --ib-gbs 25 --mfu 0.45    # another fabric, a faster step
    python bench/scaling_model.py --json                    # one JSON line per (model, GPUs)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from production_sizes import PRODUCTION_CONFIG, production_overrides, write_bert_sized_tokenizer  # noqa: E402

#: Forward + backward GFLOP per sample of the full Uni-Mlip step at 128 report tokens, measured on CPU by
#: ``python bench/flops_per_sample.py [--image vit_large_patch14_224]`` (FLOP counts do not depend on the device).
#: The default objective since issue 21 (MLM on the augmented report, ITM on half the pairs with one negative
#: each, the feature-level image pass at token drop 0.75); the earlier objective measured 666.0 and 1624.5.
MEASURED_GFLOP_PER_SAMPLE = {"vit_base_patch16_224": 506.8, "vit_large_patch14_224": 1366.5}
MODELS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/14": "vit_large_patch14_224"}
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)


@dataclass
class Inventory:
    """What one rank contributes to each collective per step (bytes), from the code at the config's sizes."""

    params: int  # trainable parameters (ZeRO-2 moves their gradients and values)
    gathered_with_grad: int  # bytes per rank, all-gathered with autograd (forward) and reduce-scattered (backward)
    gathered_no_grad: int  # bytes per rank, all-gathered without autograd (ITM's sampling, identities)
    exchanged: int  # bytes each rank receives in ITM's all-to-all (forward; the backward returns the gradients)
    exchanged_grad: int
    token_states: int  # bytes per rank of every token state ITM could sample (what a full all-gather would move)
    logit_flops_per_column: float  # forward + backward FLOPs per rank per global column of the logit matrices
    logit_bytes_per_column: float  # bytes per rank per global column kept for the backward


def inventory(image: str, batch: int, text_length: int) -> Inventory:
    """Build the production model on the meta device and walk the enabled terms' collectives."""
    from train_throughput import synthetic_batch

    from unimlip_train.config.load import load_config
    from unimlip_train.data.collate import batch_needs
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.losses.objective import UniMlipObjective
    from unimlip_train.models.build import build_model
    from unimlip_train.models.pretrained import resolve_towers

    tok = write_bert_sized_tokenizer(Path(tempfile.mkdtemp(prefix="unimlip-scaling-")) / "tokenizer")
    cfg = load_config(PRODUCTION_CONFIG, [*production_overrides(tok, text_length, 2), f"model.image.name={image}"],
                      resolve=resolve_towers)
    tokenizer = load_tokenizer(tok)
    model, objective = build_model(cfg, tokenizer), UniMlipObjective(cfg)
    with torch.no_grad():
        out = model(synthetic_batch(cfg, tokenizer, batch_needs(cfg.loss), "cpu"))
    fp32, id_bytes = 4, 8 * 2  # embeddings gathered in fp32; identities: report id and group id, int64
    compute = 2 if cfg.deepspeed.precision in ("bf16", "fp16") else 4
    width = {k: v.shape[-1] for k, v in out.items() if v.dim() == 2}
    with_grad = no_grad = 0
    flops = kept = 0.0
    for name, term in objective.terms.items():
        if term.contrastive:
            a, b = (width[k] for k in term.inputs)
            sigmoid = name == "itc" and cfg.loss.itc.kind == "sigmoid"
            with_grad += batch * fp32 * (b if sigmoid else a + b)
            no_grad += batch * id_bytes
            if name in ("itc", "itc_feature"):  # image rows x all texts and text rows x all images
                flops += 3 * 2 * batch * (a if sigmoid else a + b)
                kept += fp32 * batch * (1 if sigmoid else 2)
            else:  # NT-Xent: 2 local anchors x 2 global candidates per sample
                flops += 3 * 2 * (2 * batch) * 2 * a
                kept += fp32 * (2 * batch) * 2
    if "itm" in objective.terms:
        e = width["image_emb"]
        no_grad += batch * fp32 * 2 * e + batch * id_bytes + 3 * batch * 8  # embeddings, identities, indices
        flops += 2 * 2 * batch * e  # two similarity matrices, no backward
        kept += 2 * (4 + 8 + 8) * batch  # transient, two matrices: fp32 logits, fp64 Gumbel scores, int64 hashes
        text_row = out["text_tokens"][0].numel() * compute + out["text_mask"][0].numel() * 8
        image_row = out["image_tokens"][0].numel() * compute
        exchanged = batch * (text_row + image_row)
        exchanged_grad = batch * (out["text_tokens"][0].numel() + out["image_tokens"][0].numel()) * compute
        token_states = batch * (text_row + image_row)
    else:
        exchanged = exchanged_grad = token_states = 0
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Inventory(params, with_grad, no_grad, exchanged, exchanged_grad, token_states, flops, kept)


@dataclass
class Fabric:
    nvlink_gbs: float
    ib_gbs: float
    gpus_per_node: int
    alpha_us: float

    def bandwidth(self, n: int) -> float:
        return (self.nvlink_gbs if n <= self.gpus_per_node else self.ib_gbs) * 1e9

    def gather(self, n: int, per_rank_bytes: float) -> float:
        """All-gather (or reduce-scatter) of ``per_rank_bytes`` from each of ``n`` ranks: seconds."""
        if n == 1:
            return 0.0
        total = n * per_rank_bytes
        return self.alpha_us * 1e-6 * math.ceil(math.log2(n)) + total * (n - 1) / n / self.bandwidth(n)

    def all_to_all(self, n: int, received_bytes: float) -> float:
        """Each rank receives ``received_bytes`` spread evenly over the ranks: seconds."""
        if n == 1:
            return 0.0
        local = min(n, self.gpus_per_node)
        on_node = received_bytes * (local - 1) / n / (self.nvlink_gbs * 1e9)
        off_node = received_bytes * (n - local) / n / (self.ib_gbs * 1e9)
        return self.alpha_us * 1e-6 * math.ceil(math.log2(n)) + max(on_node, off_node)


def predict(inv: Inventory, fabric: Fabric, n: int, batch: int, gflop_per_sample: float, mfu: float,
            peak_tflops: float, zero_exposed: float) -> dict:
    rate = mfu * peak_tflops * 1e12
    compute = gflop_per_sample * 1e9 * batch / rate  # the measured step holds the one-GPU logits already
    logits_extra = inv.logit_flops_per_column * batch * (n - 1) / rate
    embeddings = 2 * fabric.gather(n, inv.gathered_with_grad) + fabric.gather(n, inv.gathered_no_grad)
    itm = fabric.all_to_all(n, inv.exchanged) + fabric.all_to_all(n, inv.exchanged_grad)
    itm_full_gather = fabric.gather(n, inv.token_states)
    zero = zero_exposed * fabric.gather(n, 4 * inv.params / n) + fabric.gather(n, 2 * inv.params / n)
    step = compute + logits_extra + embeddings + itm + zero
    ms = lambda s: round(s * 1e3, 2)  # noqa: E731
    return {"gpus": n, "step_compute_ms": ms(compute), "logits_extra_ms": ms(logits_extra),
            "embeddings_ms": ms(embeddings), "embeddings_gib_per_gpu": round(2 * inv.gathered_with_grad * n / 2**30, 3),
            "itm_exchange_ms": ms(itm), "itm_exchange_mib_per_gpu": round((inv.exchanged + inv.exchanged_grad) / 2**20, 1),
            "itm_full_gather_gib_per_gpu": round(inv.token_states * n / 2**30, 2), "itm_full_gather_ms": ms(itm_full_gather),
            "zero2_exposed_ms": ms(zero), "logits_gib_per_gpu": round(inv.logit_bytes_per_column * batch * n / 2**30, 2),
            "step_ms": ms(step), "efficiency": round(compute / step, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--batch", type=int, default=256, help="micro batch per GPU")
    p.add_argument("--text-length", type=int, default=128, help="report tokens (production config)")
    p.add_argument("--nvlink-gbs", type=float, default=360.0,
                   help="per-GPU collective bandwidth within a node, GB/s (H100/H200 NVLink 4: ~360 achieved)")
    p.add_argument("--ib-gbs", type=float, default=45.0,
                   help="per-GPU collective bandwidth across nodes, GB/s (one 400 Gb/s NIC per GPU: ~45 achieved)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--alpha-us", type=float, default=10.0, help="latency per collective stage, microseconds")
    p.add_argument("--mfu", type=float, default=0.35, help="the step's model FLOP utilisation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)")
    p.add_argument("--zero-exposed", type=float, default=0.25,
                   help="share of ZeRO-2's gradient reduce-scatter not hidden behind the backward")
    p.add_argument("--gflop", action="append", default=[], metavar="MODEL=GFLOP",
                   help="forward + backward GFLOP per sample of the full step (default: measured, see the source)")
    p.add_argument("--json", action="store_true", help="one JSON line per (model, GPUs) instead of the tables")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    gflops = dict(MEASURED_GFLOP_PER_SAMPLE, **{k: float(v) for k, v in (g.split("=") for g in args.gflop)})
    fabric = Fabric(args.nvlink_gbs, args.ib_gbs, args.gpus_per_node, args.alpha_us)
    for label, image in MODELS.items():
        inv = inventory(image, args.batch, args.text_length)
        rows = [predict(inv, fabric, n, args.batch, gflops[image], args.mfu, args.peak_tflops, args.zero_exposed)
                for n in GPU_COUNTS]
        if args.json:
            for r in rows:
                print(json.dumps({"model": label, **r}))
            continue
        print(f"\n{label} + BERT-base, batch {args.batch}/GPU, {args.text_length} tokens, {inv.params / 1e6:.0f} M "
              f"parameters, {gflops[image]:.0f} GFLOP/sample, step compute {rows[0]['step_compute_ms']:.0f} ms "
              f"(MFU {args.mfu})")
        print("| GPUs | embeddings ms (GiB/GPU) | ITM all-to-all ms | ITM as all-gather GiB/GPU | ZeRO-2 exposed ms "
              "| logits extra ms (GiB/GPU) | step ms | efficiency |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['gpus']} | {r['embeddings_ms']:.1f} ({r['embeddings_gib_per_gpu']:.2f}) | "
                  f"{r['itm_exchange_ms']:.1f} | {r['itm_full_gather_gib_per_gpu']:.1f} | {r['zero2_exposed_ms']:.1f} | "
                  f"{r['logits_extra_ms']:.1f} ({r['logits_gib_per_gpu']:.2f}) | {r['step_ms']:.0f} | {r['efficiency']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
