"""What ``unimlip-eval`` does once its arguments are parsed (``unimlip_train.cli.eval``; the SLURM ``EvalJob``
calls it too): load the checkpoint, run the command on every rank, and on rank 0 print the table and, as the
last stdout line, one JSON object of metrics (percent) with its provenance ``card`` (``--out``: also to a
file, with the card beside it).

Usage errors and unusable inputs end it with ``SystemExit`` and a one-line message, as the command does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from unimlip_train.distributed.process_group import init_distributed
from unimlip_train.eval.card import build_card, data_identity, write_card
from unimlip_train.eval.embed import embed_split, model_device
from unimlip_train.eval.linear_probe import linear_probe
from unimlip_train.eval.metrics import retrieval_metrics
from unimlip_train.eval.zeroshot import label_targets, load_prompts, zeroshot_evaluate
from unimlip_train.export import load_for_eval

# ---------------------------------------------------------------------------------------------- output

def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}"


def retrieval_table(m: dict) -> str:
    lines = [f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'median rank':>13s}"]
    for name, d in (("image -> text", "i2t"), ("text -> image", "t2i")):
        lines.append(f"{name:14s}" + "".join(f"{_fmt(m[f'{d}_R@{k}']):>8s}" for k in (1, 5, 10))
                     + f"{_fmt(m[f'median_rank_{d}']):>13s}")
    lines.append(f"mean recall {_fmt(m['mean_recall'])}   chance R@1 {_fmt(m['chance_R@1'])}   "
                 f"samples {int(m['num_samples'])}")
    return "\n".join(lines)


def classification_table(m: dict, title: str) -> str:
    lines = [title]
    per_class = sorted(k for k in m if k.startswith("auroc/"))
    if per_class:
        lines.append(f"  {'class':24s}{'AUROC':>8s}")
        lines += [f"  {k[len('auroc/'):]:24s}{_fmt(m[k]):>8s}" for k in per_class]
    for key in ("accuracy", "balanced_accuracy", "calibrated_accuracy", "calibrated_balanced_accuracy", "auroc", "l2",
                "val_balanced_accuracy", "num_samples", "num_train", "num_test", "skipped"):
        if key in m:
            lines.append(f"  {key:24s}{m[key]:>8g}" if key == "l2" else f"  {key:24s}{_fmt(m[key]):>8s}")
    return "\n".join(lines)


def _json_safe(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def emit(metrics: dict, table: str, out: str, card: dict) -> None:
    """Table, then the JSON object (metrics + ``card``) as the very last stdout line; optionally the same JSON to
    ``out`` and the card beside it."""
    doc = json.dumps({**_json_safe(metrics), "card": card}, sort_keys=False)
    print(table, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(doc + "\n")
        write_card(out, card)
    print(doc, flush=True)


# ---------------------------------------------------------------------------------------------- commands

def _targets(labels: Sequence[Sequence[str]], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return label_targets(labels, classes, multi_label=False)


def run_retrieval(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    emb = embed_split(model, cfg, tokenizer, args.data, args.split, rank, world, args.batch_size, progress=progress,
                      sample=args.sample, seed=args.seed)
    m = retrieval_metrics(emb.image, emb.text, emb.texts)
    return {"metrics": m, "table": f"retrieval  {args.data} [{args.split}]\n" + retrieval_table(m),
            "splits": {"test": args.split}, "samples": len(emb.keys), "seed": args.seed}


def run_zeroshot(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    prompts = load_prompts(args.prompts)
    emb = embed_split(model, cfg, tokenizer, args.data, args.split, rank, world, args.batch_size, progress=progress,
                      label_key=args.label_key, sample=args.sample, seed=args.seed)
    calibration = (embed_split(model, cfg, tokenizer, args.calibration_data, args.calibration_split, rank, world,
                               args.batch_size, progress=progress, sample=args.calibration_sample, seed=args.seed)
                   if args.calibration_data else None)
    m = zeroshot_evaluate(emb.image, emb.labels, model.encode_text, tokenizer, classes, prompts,
                          cfg.data.text.max_length, multi_label=args.multi_label, device=model_device(model),
                          calibration_emb=calibration.image if calibration is not None else None)
    mode = "multi-label" if args.multi_label else "single-label"
    result = {"metrics": m, "table": classification_table(m, f"zero-shot ({mode})  {args.data} [{args.split}]"),
              "splits": {"test": args.split}, "samples": int(m["num_samples"]), "seed": args.seed,
              "prompts": args.prompts}
    if calibration is not None:
        result["more_data"] = {"calibration": {**data_identity(args.calibration_data,
                                                               {"calibration": args.calibration_split}),
                                               "samples": len(calibration.keys)}}
    return result


def run_linear_probe(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    def embed(split: str):
        return embed_split(model, cfg, tokenizer, args.data, split, rank, world, args.batch_size, progress=progress,
                           label_key=args.label_key)

    train = embed(args.train_split)
    train_labels = train.labels
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] or sorted(
        {lab[0] for lab in train_labels if len(lab) == 1})
    if len(classes) < 2:
        raise SystemExit(f"unimlip-eval: need at least two classes, found {classes} in split {args.train_split!r}")
    parts = {"train": train, "test": embed(args.test_split)}
    if args.val_split:
        parts["val"] = embed(args.val_split)
    data, train_groups = {}, []
    for name, emb in parts.items():
        y, keep = _targets(emb.labels, classes)
        data[name] = (emb.image[torch.from_numpy(keep)], y[keep])
        if name == "train":
            train_groups = [g for g, k in zip(emb.groups, keep) if k]
    val_x, val_y = data.get("val", (None, None))
    m = linear_probe(*data["train"], *data["test"], classes, val_x=val_x, val_y=val_y, train_groups=train_groups)
    title = f"linear probe  {args.data} [fit {args.train_split}, test {args.test_split}]"
    val = args.val_split or f"20% of {args.train_split}'s groups"
    return {"metrics": m, "table": classification_table(m, title),
            "splits": {"train": args.train_split, "val": val, "test": args.test_split},
            "samples": {"train": int(m["num_train"]), "test": int(m["num_test"])}, "seed": None}


COMMANDS = {"retrieval": run_retrieval, "zeroshot": run_zeroshot, "linear-probe": run_linear_probe}


def run_eval(args: argparse.Namespace) -> int:
    """``unimlip-eval COMMAND`` for its parsed arguments (``unimlip_train.cli.eval.build_parser``); returns 0."""
    rank, world, local_rank = init_distributed()
    try:
        try:
            model, cfg, tokenizer = load_for_eval(args.checkpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"unimlip-eval: cannot load checkpoint {args.checkpoint!r}: {e}") from None
        if args.workers is not None:
            cfg.data.num_workers = args.workers
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        model = model.to(device).eval()
        try:
            result = COMMANDS[args.command](args, model, cfg, tokenizer, rank, world, progress=rank == 0)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"unimlip-eval {args.command}: {e}") from None
        if rank == 0:
            data = {**data_identity(args.data, result["splits"]), **result.get("more_data", {})}
            card = build_card(f"unimlip-eval {args.command}", args.checkpoint, cfg, data, result["samples"],
                              result["seed"], prompts=result.get("prompts"))
            emit(result["metrics"], result["table"], args.out, card)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
