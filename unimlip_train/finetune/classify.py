"""Fine-tuned classification, the CXR-CLIP / MGCA protocol: the pre-trained image tower plus a linear head, trained
on a fraction of the training labels (1 / 10 / 100 %, sampled by patient group with a seed, every class kept),
the epoch chosen on the validation split (carved from train by group when the data has none), and scored once on
the test split: accuracy, balanced accuracy, per-class and macro AUROC (multi-label: one sigmoid per class,
label-wise accuracy and macro AUROC).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import unimlip_train.eval.metrics as M
from unimlip_train.eval.embed import meta_labels
from unimlip_train.eval.groups import carve_groups, sample_groups
from unimlip_train.eval.zeroshot import label_targets, normalise_name
from unimlip_train.finetune.data import batched, items, shuffled, split_samples
from unimlip_train.finetune.loop import param_groups, train_epochs

VAL_FRACTION = 0.2  # of train's groups, when the data has no validation split
SHUFFLE_BUFFER = 2000


class Classifier(nn.Module):
    """``logits = head(pooled image feature)``: the image tower's own pooling, one linear layer."""

    def __init__(self, image_tower: nn.Module, num_classes: int):
        super().__init__()
        self.image_tower = image_tower
        self.head = nn.Linear(image_tower.num_features, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_tower(image)[0].float())


@dataclass
class LabelledSplit:
    """Samples of one split that carry a usable label: keys, targets (index or 0/1 row), groups, strata."""

    keys: list[str]
    targets: np.ndarray
    groups: list[str]
    strata: list[int]

    def take(self, idx: np.ndarray) -> "LabelledSplit":
        return LabelledSplit([self.keys[i] for i in idx], self.targets[idx], [self.groups[i] for i in idx],
                             [self.strata[i] for i in idx])

    def target_of(self) -> dict[str, np.ndarray]:
        return dict(zip(self.keys, self.targets))


def labelled(samples: list[tuple[str, dict]], label_key: str, classes: list[str], multi_label: bool) -> LabelledSplit:
    """Single-label: samples with exactly one of ``classes``; multi-label: every sample (a 0/1 row)."""
    targets, keep = label_targets([meta_labels(m, label_key) for _, m in samples], classes, multi_label)
    kept = [s for s, k in zip(samples, keep) if k]
    targets = targets[keep]
    # multi-label strata: the first positive class (-1: none), so rare findings keep their share of the fraction
    strata = targets.tolist() if not multi_label else [int(np.argmax(t)) if t.any() else -1 for t in targets]
    return LabelledSplit([k for k, _ in kept], targets, [str(m.get("group") or k) for k, m in kept], strata)


def default_classes(samples: list[tuple[str, dict]], label_key: str, multi_label: bool) -> list[str]:
    """Every label in train (multi-label), or the labels of single-labelled samples (single-label)."""
    lists = [meta_labels(m, label_key) for _, m in samples]
    names = {normalise_name(x): x for labs in lists for x in labs if multi_label or len(labs) == 1}
    return sorted(names.values())


def scores_and_metrics(logits: torch.Tensor, targets: np.ndarray, classes: list[str], multi_label: bool) -> dict:
    if multi_label:
        return M.multi_label_metrics(logits, targets, classes)
    return M.single_label_metrics(M.one_vs_rest_log_odds(logits), targets, classes)


def selection_score(m: dict) -> float:
    """Macro AUROC; balanced accuracy where no class has both outcomes in the validation split."""
    return m["auroc"] if not np.isnan(m["auroc"]) else m["balanced_accuracy"]


def run(args, model, cfg, tokenizer, device: torch.device, out: str) -> dict:
    """Fine-tune, select, test; writes ``model.safetensors``, ``classes.json`` and ``samples.json`` (the keys
    trained and validated on) into ``out``."""
    train_all = split_samples(args.data, args.train_split)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else default_classes(
        train_all, args.label_key, args.multi_label)
    if len(classes) < (1 if args.multi_label else 2):
        raise ValueError(f"need at least two classes, found {classes} in split {args.train_split!r} "
                         f"(label key {args.label_key!r})")
    pool = labelled(train_all, args.label_key, classes, args.multi_label)
    if args.val_split:
        val = labelled(split_samples(args.data, args.val_split), args.label_key, classes, args.multi_label)
        val_split, val_name = args.val_split, args.val_split
    else:
        fit_idx, val_idx = carve_groups(pool.strata, pool.groups, VAL_FRACTION, args.seed)
        pool, val = pool.take(fit_idx), pool.take(val_idx)
        val_split, val_name = args.train_split, f"{int(VAL_FRACTION * 100)}% of {args.train_split}'s groups"
        print(f"no validation split: the epoch is chosen on {val_name} ({len(val.keys)} samples, by patient group, "
              f"by class), never on {args.test_split}", flush=True)
    train = pool.take(sample_groups(pool.strata, pool.groups, args.fraction, args.seed))
    test = labelled(split_samples(args.data, args.test_split), args.label_key, classes, args.multi_label)
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if not part.keys:
            raise ValueError(f"no {name} sample carries one of the classes {classes} (label key {args.label_key!r})")

    torch.manual_seed(args.seed)
    tower = model.image_tower
    tower.unlock()
    if args.lock_image:
        tower.lock(args.unlocked_groups, "--unlocked-groups")
    classifier = Classifier(tower, len(classes)).to(device)
    loss_of = nn.BCEWithLogitsLoss() if args.multi_label else nn.CrossEntropyLoss()
    train_targets = train.target_of()

    def batches(epoch: int):
        pairs = ((image, train_targets[key]) for key, image, _ in
                 items(cfg, args.data, args.train_split, tokenizer, frozenset(train.keys), args.batch_size))
        return batched(shuffled(pairs, SHUFFLE_BUFFER, args.seed * 1000 + epoch), args.batch_size)

    def loss_fn(batch) -> torch.Tensor:
        images = torch.stack([b[0] for b in batch]).to(device)
        targets = torch.as_tensor(np.stack([b[1] for b in batch]), device=device)
        logits = classifier(images)
        return loss_of(logits, targets.float() if args.multi_label else targets.long())

    def predict(split: str, part: LabelledSplit) -> dict:
        got = {}
        for chunk in batched(items(cfg, args.data, split, tokenizer, frozenset(part.keys), args.batch_size),
                             args.batch_size):
            logits = classifier(torch.stack([image for _, image, _ in chunk]).to(device)).float().cpu()
            got.update(zip((key for key, _, _ in chunk), logits))
        order = [k for k in part.keys if k in got]  # a corrupt sample was skipped by the loader
        targets = part.target_of()
        return scores_and_metrics(torch.stack([got[k] for k in order]), np.stack([targets[k] for k in order]),
                                  classes, args.multi_label)

    groups = param_groups(classifier, [tower], args.lr, args.lr_head, args.weight_decay, args.layer_decay)
    history = train_epochs(classifier, groups, args.epochs, -(-len(train.keys) // args.batch_size), batches, loss_fn,
                           lambda: selection_score(predict(val_split, val)))
    with torch.no_grad():
        result = predict(args.test_split, test)
    best = max(history, key=lambda h: h["val"])
    result.update(num_train=float(len(train.keys)), num_val=float(len(val.keys)), best_epoch=float(best["epoch"]),
                  val_score=best["val"])

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "classes.json"), "w", encoding="utf-8") as f:
        json.dump({"classes": classes, "multi_label": args.multi_label, "label_key": args.label_key}, f, indent=1)
    with open(os.path.join(out, "samples.json"), "w", encoding="utf-8") as f:  # which labels the fraction used
        json.dump({"train": train.keys, "val": val.keys}, f)
    return {"metrics": result, "epochs": history,
            "splits": {"train": args.train_split, "val": val_name, "test": args.test_split},
            "samples": {"train": len(train.keys), "val": len(val.keys), "test": int(result["num_samples"])}}
