"""``unimlip-eval``: retrieval, zero-shot classification and linear probe for a checkpoint on a shard set.

Runs alone or under ``torchrun`` / ``srun`` (every rank embeds its share, rank 0 prints). Each command prints a
readable table and, as its last stdout line, one JSON object of metrics (percent) with its provenance ``card``;
``--out`` writes it to a file and the card beside it (``card-NAME``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

import numpy as np
import torch

EPILOG = """examples:
  unimlip-eval retrieval --checkpoint runs/x --data shards/index.json --split val
  unimlip-eval retrieval --checkpoint runs/x --data roco/ --split test --sample 2000 --seed 0
  unimlip-eval zeroshot --checkpoint runs/x --data shards/ --classes normal,pneumonia
  unimlip-eval zeroshot --checkpoint export/ --data shards/ --classes cardiomegaly,edema --multi-label
  unimlip-eval linear-probe --checkpoint runs/x --data shards/ --train-split train --test-split val
  torchrun --nproc_per_node 4 -m unimlip_train.eval.cli retrieval --checkpoint runs/x --data shards/

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
    for key in ("accuracy", "balanced_accuracy", "auroc", "l2", "val_balanced_accuracy", "num_samples",
                "num_train", "num_test", "skipped"):
        if key in m:
            lines.append(f"  {key:24s}{m[key]:>8g}" if key == "l2" else f"  {key:24s}{_fmt(m[key]):>8s}")
    return "\n".join(lines)


def _json_safe(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def emit(metrics: dict, table: str, out: str, card: dict) -> None:
    """Table, then the JSON object (metrics + ``card``) as the very last stdout line; optionally the same JSON to
    ``out`` and the card beside it."""
    from unimlip_train.eval.card import write_card

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
    from unimlip_train.eval.zeroshot import label_targets

    return label_targets(labels, classes, multi_label=False)


def run_retrieval(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    from unimlip_train.eval.embed import embed_split
    from unimlip_train.eval.metrics import retrieval_metrics

    emb = embed_split(model, cfg, tokenizer, args.data, args.split, rank, world, args.batch_size, progress=progress,
                      sample=args.sample, seed=args.seed)
    m = retrieval_metrics(emb.image, emb.text, emb.texts)
    return {"metrics": m, "table": f"retrieval  {args.data} [{args.split}]\n" + retrieval_table(m),
            "splits": {"test": args.split}, "samples": len(emb.keys), "seed": args.seed}


def run_zeroshot(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    from unimlip_train.eval.embed import embed_split, model_device
    from unimlip_train.eval.zeroshot import load_prompts, zeroshot_evaluate

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    prompts = load_prompts(args.prompts)
    emb = embed_split(model, cfg, tokenizer, args.data, args.split, rank, world, args.batch_size, progress=progress,
                      label_key=args.label_key, sample=args.sample, seed=args.seed)
    m = zeroshot_evaluate(emb.image, emb.labels, model.encode_text, tokenizer, classes, prompts,
                          cfg.data.text.max_length, multi_label=args.multi_label, device=model_device(model))
    mode = "multi-label" if args.multi_label else "single-label"
    return {"metrics": m, "table": classification_table(m, f"zero-shot ({mode})  {args.data} [{args.split}]"),
            "splits": {"test": args.split}, "samples": int(m["num_samples"]), "seed": args.seed,
            "prompts": args.prompts}


def run_linear_probe(args, model, cfg, tokenizer, rank, world, progress) -> dict:
    from unimlip_train.eval.embed import embed_split
    from unimlip_train.eval.linear_probe import linear_probe

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unimlip_train.distributed import init_distributed
    from unimlip_train.eval.card import build_card, data_identity
    from unimlip_train.export import load_for_eval

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
            card = build_card(f"unimlip-eval {args.command}", args.checkpoint, cfg,
                              data_identity(args.data, result["splits"]), result["samples"], result["seed"],
                              prompts=result.get("prompts"))
            emit(result["metrics"], result["table"], args.out, card)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
