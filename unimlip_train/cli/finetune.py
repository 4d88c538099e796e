"""``unimlip-finetune``: fine-tune a pre-trained checkpoint for classification or medical VQA and score it.

One process (a GPU when there is one). Each command prints per-epoch lines and a table, and as its last stdout
line one JSON object: classify with ``accuracy``, ``balanced_accuracy``, ``auroc`` (+ per-class AUROC), vqa with
``closed_accuracy``, ``open_accuracy``, ``overall_accuracy``, ``majority_baseline``; both with the provenance
``card``. ``--out DIR`` receives ``metrics.json`` (that object), ``card.json``, the fine-tuned
``model.safetensors`` and ``classes.json`` + ``samples.json`` (the keys trained and validated on) /
``answers.json`` + ``predictions.jsonl`` (every test question with its predicted answer).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

EPILOG = """examples:
  unimlip-finetune classify --checkpoint runs/x --data shards/ --label-key labels --classes normal,pneumonia \\
      --fraction 0.01 --epochs 10 --out ft/pneumonia_1pct
  unimlip-finetune classify --checkpoint runs/x --data chexpert/ --label-key labels --multi-label \\
      --classes Atelectasis,Cardiomegaly,Consolidation,Edema,"Pleural Effusion" --fraction 0.1 --out ft/chexpert_10pct
  unimlip-finetune vqa --checkpoint runs/x --data vqa_rad_shards/ --epochs 30 --out ft/vqa_rad

--checkpoint takes a run dir, a checkpoint tag or an `unimlip-export` folder; --data a shard dir or index.json.
Metrics are percentages, scored on --test-split with the epoch chosen on --val-split: by default the data's
'val' split, or, when it has none (or 'val' is the test split), a part of the training split carved by
patient group, with a message. The validation split is never the test split: naming the same split for both
is an error (exit status 2, as for a split the data does not have)."""


def _add_common(p: argparse.ArgumentParser, epochs: int, lr: float, batch: int) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint tag dir, or unimlip-export folder")
    p.add_argument("--data", required=True, help="shard dir or index.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, card.json, weights)")
    p.add_argument("--train-split", default="train", help="split to fine-tune on (default: train)")
    p.add_argument("--val-split", default=None,
                   help="split for model selection, never the test split (default: val when the data has it and "
                        "it is not the test split, else, as with '', a part of the training split carved by patient "
                        "group)")
    p.add_argument("--test-split", default="test", help="split to score (default: test)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate of the pre-trained towers (default {lr:g})")
    p.add_argument("--lr-head", type=float, default=0.0,
                   help="learning rate of the new head (and a fresh fusion encoder) (default: 10 x --lr)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay of the towers (default 1: off)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--batch-size", type=int, default=batch, help=f"batch size (default {batch})")
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (train only what is above it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label fraction, validation carve, order, init")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: from the checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimlip-finetune", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{classify,vqa}")
    c = sub.add_parser("classify", help="image tower + linear head on a fraction of the labels", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(c, epochs=10, lr=1e-4, batch=64)
    c.add_argument("--label-key", required=True, help="metadata field holding the labels (e.g. labels)")
    c.add_argument("--classes", default="", help="comma-separated classes (default: every label in train)")
    c.add_argument("--multi-label", action="store_true", help="one sigmoid per class (CheXpert-style)")
    c.add_argument("--fraction", type=float, default=1.0,
                   help="fraction of the training labels used, sampled by patient group (e.g. 0.01, 0.1, 1)")
    c.add_argument("--unlocked-groups", type=int, default=0,
                   help="with --lock-image: its last N layer groups stay trainable (open_clip's rule)")
    v = sub.add_parser("vqa", help="towers + fusion encoder + answer classifier (M3AE / PMC-CLIP protocol)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(v, epochs=20, lr=5e-5, batch=32)
    v.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unimlip_train.finetune.run import run_finetune  # torch and the towers load after parsing: --help stays quick

    return run_finetune(args)


if __name__ == "__main__":
    sys.exit(main())
