"""``unimlip-eval``: retrieval, zero-shot classification and linear probe for a checkpoint on a shard set.

Runs alone or under ``torchrun`` / ``srun`` (every rank embeds its share, rank 0 prints). Each command prints a
readable table and, as its last stdout line, one JSON object of metrics (percent) with its provenance ``card``;
``--out`` writes it to a file and the card beside it (``card-NAME``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

EPILOG = """examples:
  unimlip-eval retrieval --checkpoint runs/x --data shards/index.json --split val
  unimlip-eval retrieval --checkpoint runs/x --data roco/ --split test --sample 2000 --seed 0
  unimlip-eval zeroshot --checkpoint runs/x --data shards/ --classes normal,pneumonia
  unimlip-eval zeroshot --checkpoint runs/x --data shards/ --classes normal,pneumonia --calibration-data shards/
  unimlip-eval zeroshot --checkpoint export/ --data shards/ --classes cardiomegaly,edema --multi-label
  unimlip-eval linear-probe --checkpoint runs/x --data shards/ --train-split train --test-split val
  torchrun --nproc_per_node 4 -m unimlip_train.cli.eval retrieval --checkpoint runs/x --data shards/

--checkpoint takes a run dir, a checkpoints dir, one checkpoint tag or an `unimlip-export` folder.
--data takes a shard directory, its index.json, or a brace pattern of .tar shards.
Metrics are percentages. Retrieval counts images with identical report text as correct for each other."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint tag dir, or unimlip-export folder")
    p.add_argument("--data", required=True, help="shard dir, index.json or shard pattern")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size (default 64)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per rank (default: from config)")
    p.add_argument("--out", default="", help="also write the JSON metrics to this file (and its card beside it)")


def _add_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="evaluate a seeded random subset of N samples (e.g. 2000, PMC-CLIP's ROCO protocol); "
                        "the others are skipped undecoded (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")


def _add_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-key", default="labels",
                   help="metadata field holding the sample's labels (list of str or a str; default: labels)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject option combinations that cannot work, before any model is loaded."""
    if args.command == "zeroshot" and args.calibration_data and args.multi_label:
        parser.error("--calibration-data is single-label only: a class mean says nothing about a finding's "
                     "prevalence under --multi-label")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimlip-eval", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{retrieval,zeroshot,linear-probe}")
    r = sub.add_parser("retrieval", help="image<->text recall@1/5/10, median rank", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(r)
    _add_sample(r)
    r.add_argument("--split", default="val", help="split of an index.json / shard dir (default: val)")
    z = sub.add_parser("zeroshot", help="zero-shot classification from class prompts", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(z)
    _add_sample(z)
    z.add_argument("--split", default="val", help="split of an index.json / shard dir (default: val)")
    z.add_argument("--classes", required=True, help="comma-separated class names, e.g. normal,pneumonia")
    z.add_argument("--prompts", default="", help="prompt YAML (default: the packaged unimlip_train/resources/prompts/chest_xray.yaml)")
    z.add_argument("--multi-label", action="store_true",
                   help="one binary decision per class (finding vs 'no finding' prompts), CheXpert-style")
    z.add_argument("--calibration-data", default="",
                   help="also report calibrated_accuracy / calibrated_balanced_accuracy: each class's logit minus "
                        "its mean over these images, labels unused (e.g. the training shards; single-label only)")
    z.add_argument("--calibration-split", default="train", help="split of --calibration-data (default: train)")
    z.add_argument("--calibration-sample", type=int, default=0, metavar="N",
                   help="calibrate on a seeded random subset of N images (seed --seed; 0: all)")
    _add_labels(z)
    lp = sub.add_parser("linear-probe", help="logistic regression on frozen image embeddings", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(lp)
    lp.add_argument("--train-split", default="train", help="split to fit on (default: train)")
    lp.add_argument("--test-split", default="val", help="split to score (default: val)")
    lp.add_argument("--val-split", default="",
                    help="split to choose the L2 penalty on (default: 20%% of train's groups (patients), by class)")
    lp.add_argument("--classes", default="", help="comma-separated classes (default: all single labels in train)")
    _add_labels(lp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = check_args(parser, parser.parse_args(argv))
    from unimlip_train.eval.run import run_eval  # torch and the towers load after parsing: --help stays quick

    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
