"""Could report similarity stand in for labels as text SSL positives on the real protocol (issue 21)?

MedCLIP (Wang et al. 2022) counts two reports as alike when their *labels* agree. Without a labeller, the
label-free stand-in is word overlap: call two different reports positives when the Jaccard index of their word
sets reaches a threshold. This measures, on the class-paired training reports ``bench/real_ablation.py`` writes,
how well that rule finds same-class pairs: for each threshold, the share of sample pairs it selects, the share
of those that are same-class (precision; half the pairs are same-class by construction), and the share of the
normal-normal and pneumonia-pneumonia pairs it finds (recall); the same for a second rule, equal impression
sections (what many normal IU reports share). Pairs with the same normalised report are left out: the losses
already treat those as one identity (``loss.positives``). Words: the report body as the model reads it by
default (impression, findings), lower-cased, IU's ``XXXX`` anonymisation left out.

    python bench/real_ablation.py --seeds 0     # its first step writes runs/real_ablation/pairs/manifest.csv
    python bench/report_similarity.py --pairs runs/real_ablation/pairs/manifest.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

from unimlip_train.format.report_text import normalise_report, report_body, section_texts, split_sections

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def word_sets(texts: list[str]) -> np.ndarray:
    """Samples x vocabulary, 1 where the report body has the word."""
    sets = [set(re.findall(r"[a-z]+", report_body(t).lower())) - {"xxxx"} for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*sets)))}
    words = np.zeros((len(sets), len(vocab)), dtype=np.float32)
    for row, s in enumerate(sets):
        words[row, [vocab[w] for w in s]] = 1.0
    return words


def rule_row(chosen: np.ndarray, pairs: np.ndarray, same: np.ndarray, kinds: dict) -> dict:
    """The share of ``pairs`` a rule selects, its same-class precision and its recall per same-class kind."""
    row = {"selected": round(float(chosen.sum() / pairs.sum()), 4),
           "precision_same_class": round(float((chosen & same).sum() / max(chosen.sum(), 1)), 3)}
    row.update({f"recall_{k}": round(float((chosen & m).sum() / m.sum()), 3) for k, m in kinds.items() if k != "between"})
    return row


def similarity_table(texts: list[str], labels: list[str]) -> dict:
    """Median Jaccard within / between classes and, per rule (Jaccard threshold, equal impression), its
    precision and recall."""
    words = word_sets(texts)
    inter = words @ words.T
    sizes = words.sum(1)
    jaccard = inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1.0)
    norm = np.array([normalise_report(t) for t in texts])
    lab = np.array(labels)
    upper = np.triu(np.ones_like(jaccard, dtype=bool), k=1) & (norm[:, None] != norm[None, :])
    same = upper & (lab[:, None] == lab[None, :])
    kinds = {f"{c}-{c}": same & (lab[:, None] == c) for c in sorted(set(labels))}
    kinds["between"] = upper & ~same
    out = {"samples": len(texts), "pairs": int(upper.sum()),
           "median_jaccard": {k: round(float(np.median(jaccard[m])), 3) for k, m in kinds.items()}, "thresholds": []}
    for t in THRESHOLDS:
        out["thresholds"].append({"threshold": t, **rule_row(upper & (jaccard >= t), upper, same, kinds)})
    impression = np.array([normalise_report(" ".join(section_texts(split_sections(t), ("impression",))))
                           for t in texts])
    equal = upper & (impression[:, None] == impression[None, :]) & (impression != "")[:, None]
    out["equal_impression"] = rule_row(equal, upper, same, kinds)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=str(REPO / "runs" / "real_ablation" / "pairs" / "manifest.csv"),
                   help="the class-paired manifest (columns text, labels, source_split)")
    p.add_argument("--split", default="train", help="source_split rows to read (default train)")
    args = p.parse_args()
    if not Path(args.pairs).is_file():
        p.error(f"not found: {args.pairs} (python bench/real_ablation.py writes it)")
    with open(args.pairs, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source_split"] == args.split]
    if not rows:
        p.error(f"no rows with source_split={args.split} in {args.pairs}")
    table = similarity_table([r["text"] for r in rows], [r["labels"] for r in rows])
    print(f"{table['samples']} samples, {table['pairs']} pairs of different reports; median Jaccard "
          + ", ".join(f"{k} {v}" for k, v in table["median_jaccard"].items()))
    for row in table["thresholds"] + [{"rule": "equal impression", **table["equal_impression"]}]:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
