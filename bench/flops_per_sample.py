"""FLOPs per sample of the full Uni-Mlip training step against the CLIP-only step, with a per-pass breakdown.

FLOP counts (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention) depend only on
the shapes, not on the device, so this runs on CPU at the production sizes: ViT-B/16 at 224 px (or any timm
model, ``--image``), random-init BERT-base with BERT's vocabulary, the production config's heads and fusion
encoder, a small batch, one forward + backward of the real ``TrainStep`` (model + objective; the optimizer
adds no counted FLOPs). Attention runs through PyTorch's math backend while counting: the CPU's fused SDPA
kernel is not in the counter's registry and would count as zero.

The breakdown measures each tower pass, fusion pass and head on its own (forward + backward, the same
modules and shapes) and lists how often the step runs it (read from the config: ``step_passes``); "heads,
projections, losses" is the step's total minus the passes. Overrides change the full step only (the CLIP-only
step is the same config with every other term off), e.g. the issue-21 cost options one at a time.

    python bench/flops_per_sample.py                       # ViT-B/16 + BERT-base, 128 tokens
    python bench/flops_per_sample.py --text-length 77      # open_clip's context length
    python bench/flops_per_sample.py --json-out flops.json loss.mlm_view=report    # one option back
    python bench/flops_per_sample.py --image vit_large_patch14_224 --json-out flops_l14.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from production_sizes import CLIP_ONLY, PRODUCTION_CONFIG, production_overrides, write_bert_sized_tokenizer  # noqa: E402
from train_throughput import count_flops, synthetic_batch  # noqa: E402


def step_flops(cfg, tokenizer) -> tuple[int, object, dict]:
    """FLOPs of one training forward + backward of ``cfg``'s TrainStep; also the model and the batch."""
    from unimlip_train.data.collate import batch_needs
    from unimlip_train.losses.objective import UniMlipObjective
    from unimlip_train.models.build import TrainStep, build_model

    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    step = TrainStep(model, UniMlipObjective(cfg)).train()
    batch = synthetic_batch(cfg, tokenizer, batch_needs(cfg.loss), "cpu")
    return count_flops(lambda: step(batch, 0)[0].backward()), model, batch


def pass_flops(model, batch: dict) -> dict:
    """Forward + backward FLOPs of each kind of pass the full step runs, measured one at a time (fusion: per B
    rows, however many row sets the step fuses)."""
    model.zero_grad(set_to_none=True)
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]

    def tower(fn):
        return lambda: sum(o.float().sum() for o in fn()).backward()

    out = {"image pass": count_flops(tower(lambda: model.image_tower(image))),
           "image pass, patch dropout": count_flops(tower(lambda: model.image_tower(image, perturb=True))),
           "text pass": count_flops(tower(lambda: model.text_tower(ids, mask)))}
    if hasattr(model, "fusion"):
        with torch.no_grad():
            text_tokens = model.text_tower(ids, mask)[1]
            image_tokens = model.image_tower(image)[1]
        t, i = text_tokens.clone().requires_grad_(), image_tokens.clone().requires_grad_()
        per_b = count_flops(lambda: model.fuse(t, mask, i).float().sum().backward())
        out["fusion, MLM rows (B)"] = out["fusion, ITM rows"] = per_b
    return out


def step_passes(cfg) -> tuple[dict, dict]:
    """How many times the full step runs each pass (``UniMlip.forward`` and the MLM / ITM terms) under ``cfg``,
    and which terms use each: ``{pass: runs}``, ``{pass: used by}``."""
    loss, on = cfg.loss, set(cfg.loss.enabled())
    encoder = loss.feature_noise == "encoder"
    perturbed = int(encoder and bool(on & {"itc_feature", "image_feature"}))
    perturbed += int(encoder and "image_feature" in on and loss.image_feature_pair == "two_noised")
    text = {"report": 1, "augmented report (text_ssl" + (", mlm)" if loss.mlm_view == "augmented" else ")"):
            int("text_ssl" in on),
            "dropout pass (itc_feature, text_feature)": int(encoder and bool(on & {"itc_feature", "text_feature"})),
            "masked report (mlm)": int("mlm" in on and loss.mlm_view == "report")}
    itm_sets = (2 if loss.itm_negatives == "one_per_pair" else 3) * loss.itm_fraction if "itm" in on else 0
    runs = {"image pass": 1 + int("image_ssl" in on), "image pass, patch dropout": perturbed,
            "text pass": sum(text.values()), "fusion, MLM rows (B)": int("mlm" in on),
            "fusion, ITM rows": itm_sets}
    itm = (f"itm ({loss.itm_fraction:g} of the pairs x (positive + "
           f"{'1 hard negative' if loss.itm_negatives == 'one_per_pair' else '2 hard negatives'}))")
    users = {"image pass": "view 1 (every term)" + (", view 2 (image_ssl)" if "image_ssl" in on else ""),
             "image pass, patch dropout": f"itc_feature, image_feature (token drop {cfg.model.image.token_drop:g})",
             "text pass": ", ".join(k for k, v in text.items() if v), "fusion, MLM rows (B)": "mlm",
             "fusion, ITM rows": itm}
    return runs, users


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="vit_base_patch16_224", help="timm image tower (default ViT-B/16)")
    p.add_argument("--text-length", type=int, default=128, help="report tokens (production config: 128)")
    p.add_argument("--batch", type=int, default=2, help="samples per counted step (FLOPs scale linearly)")
    p.add_argument("--json-out", metavar="F", help="write the result (with full_over_clip) as one JSON object to F")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="further config overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from unimlip_train.config.load import load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.models.pretrained import resolve_towers

    tok_dir = write_bert_sized_tokenizer(Path(tempfile.mkdtemp(prefix="unimlip-flops-")) / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    base = [*production_overrides(tok_dir, args.text_length, args.batch), f"model.image.name={args.image}",
            *args.overrides]
    b = args.batch
    clip_cfg = load_config(PRODUCTION_CONFIG, base + CLIP_ONLY, resolve=resolve_towers)
    clip_total, clip_model, clip_batch = step_flops(clip_cfg, tokenizer)
    clip_passes = pass_flops(clip_model, clip_batch)
    del clip_model
    full_cfg = load_config(PRODUCTION_CONFIG, base, resolve=resolve_towers)
    full_total, full_model, full_batch = step_flops(full_cfg, tokenizer)
    passes = pass_flops(full_model, full_batch)
    step_runs, pass_users = step_passes(full_cfg)

    g = lambda flops: flops / b / 1e9  # noqa: E731  GFLOP per sample
    clip_g = g(clip_total)
    text = full_model.text_tower.model.config
    print(f"{args.image} + BERT (width {text.hidden_size}, {text.num_hidden_layers} layers, vocabulary "
          f"{text.vocab_size}), {args.text_length} tokens, batch {b}: forward + backward GFLOP per sample")
    print(f"CLIP-only step: {clip_g:8.1f}  (image pass {g(clip_passes['image pass']):.1f}, text pass "
          f"{g(clip_passes['text pass']):.1f}, heads and loss {clip_g - g(clip_passes['image pass'] + clip_passes['text pass']):.1f})")
    print(f"full Uni-Mlip:  {g(full_total):8.1f}  = {full_total / clip_total:.2f}x CLIP-only\n")
    print(f"{'pass':28s} {'runs':>4s} {'GFLOP/smp':>10s} {'x CLIP':>7s}  used by")
    rows, accounted = [], 0
    for name, runs in step_runs.items():
        if name not in passes or not runs:
            continue
        total = runs * passes[name]
        accounted += total
        rows.append({"pass": name, "runs": runs, "gflop_per_sample": round(g(total), 2),
                     "of_clip_step": round(total / clip_total, 3)})
        print(f"{name:28s} {runs:4g} {g(total):10.1f} {total / clip_total:7.2f}  {pass_users[name]}")
    rest = full_total - accounted
    rows.append({"pass": "heads, projections, losses", "runs": 1, "gflop_per_sample": round(g(rest), 2),
                 "of_clip_step": round(rest / clip_total, 3)})
    print(f"{'heads, projections, losses':28s} {1:4d} {g(rest):10.1f} {rest / clip_total:7.2f}  "
          "SSL heads, MLM / ITM heads, projections, logits")
    record = {"image": args.image, "text_length": args.text_length, "batch": b, "overrides": args.overrides,
              "clip_gflop_per_sample": round(clip_g, 2), "full_gflop_per_sample": round(g(full_total), 2),
              "full_over_clip": round(full_total / clip_total, 3),
              "pass_gflop_per_sample": {k: round(g(v), 2) for k, v in passes.items()}, "breakdown": rows}
    print(json.dumps(record))
    if args.json_out:  # one JSON object (the issue-21 command contract: it holds full_over_clip)
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
