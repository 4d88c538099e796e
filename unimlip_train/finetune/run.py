"""What ``unimlip-finetune`` does once its arguments are parsed (``unimlip_train.cli.finetune``): check them, load
the checkpoint, fine-tune and score (``classify`` or ``vqa``), then write ``metrics.json`` and ``card.json`` into
``--out`` and print the table and, as the last stdout line, the metrics JSON with its card.

Unusable arguments or splits end it with exit status 2 and a one-line message, before the checkpoint loads;
other unusable inputs with ``SystemExit`` (status 1) and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import unimlip_train.finetune.classify as classify
import unimlip_train.finetune.vqa as vqa
from unimlip_train.eval.card import build_card, data_identity, write_card
from unimlip_train.export import load_for_eval
from unimlip_train.finetune.data import has_split, split_problem


def _fmt(v) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v)


def table(command: str, m: dict) -> str:
    keys = (["accuracy", "balanced_accuracy", "auroc"] + sorted(k for k in m if k.startswith("auroc/"))
            + ["num_samples", "num_train", "best_epoch"] if command == "classify" else
            ["closed_accuracy", "open_accuracy", "overall_accuracy", "majority_baseline", "majority_closed",
             "majority_open", "num_questions", "num_answers", "best_epoch"])
    return "\n".join([f"fine-tuned {command} (test split)"] + [f"  {k:24s}{_fmt(m[k]):>8s}" for k in keys if k in m])


def _check(args) -> None:
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    if getattr(args, "fraction", 1.0) <= 0 or getattr(args, "fraction", 1.0) > 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    if getattr(args, "unlocked_groups", 0) and not args.lock_image:
        raise ValueError("--unlocked-groups applies with --lock-image")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")


def _check_splits(args) -> None:
    """The train and test splits exist; the validation split is another split the data has, or, not named,
    the data's 'val' unless that is the test split (``args.val_split`` '' then, as when given '': carved from
    train by group)."""
    for flag, split in (("--train-split", args.train_split), ("--test-split", args.test_split)):
        if problem := split_problem(args.data, split):
            raise ValueError(f"{flag} {split}: {problem}")
    if args.val_split is None:
        args.val_split = "val" if "val" not in (args.train_split, args.test_split) and has_split(args.data, "val") else ""
    elif args.val_split == "":  # asked for: carved from train
        return
    elif args.val_split in (args.test_split, args.train_split):
        which = "test" if args.val_split == args.test_split else "training"
        raise ValueError(f"--val-split {args.val_split} is also the {which} split: the epoch would be chosen on the "
                         f"{which} data; name another split, or leave --val-split out to carve one from "
                         f"{args.train_split} by patient group")
    elif problem := split_problem(args.data, args.val_split):
        raise ValueError(f"--val-split {args.val_split}: {problem}; leave it out to carve one from {args.train_split}")


def run_finetune(args: argparse.Namespace) -> int:
    """``unimlip-finetune COMMAND`` for its parsed arguments (``unimlip_train.cli.finetune.build_parser``)."""
    try:
        _check(args)
        _check_splits(args)
    except ValueError as e:
        print(f"unimlip-finetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        model, cfg, tokenizer = load_for_eval(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(f"unimlip-finetune {args.command}: {e}") from None
    if args.lr_head == 0.0:
        args.lr_head = 10 * args.lr
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    os.makedirs(args.out, exist_ok=True)
    task = {"classify": classify, "vqa": vqa}[args.command]
    try:
        result = task.run(args, model, cfg, tokenizer, device, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"unimlip-finetune {args.command}: {e}") from None
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint", "data", "out", "workers")}
    card = build_card(f"unimlip-finetune {args.command}", args.checkpoint, cfg,
                      data_identity(args.data, result["splits"]), result["samples"], args.seed)
    card["settings"] = settings
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result["metrics"].items()}
    doc = {**metrics, "epochs": result["epochs"], "card": card}
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    write_card(args.out, card)
    print(table(args.command, result["metrics"]), flush=True)
    print(json.dumps(doc), flush=True)
    return 0
