"""Evaluation metrics as pure functions of tensors / arrays (no I/O, no distributed state).

Conventions, chosen so that an uninformative model cannot look good:

* **Ties are pessimistic.** A query's rank is 1 + the number of *wrong* candidates that score at least as high
  as its best correct candidate, so a constant-score model gets the worst rank, not the best.
* **Duplicate reports.** In retrieval, samples whose report text is identical (after whitespace normalisation
  and case-folding: ``unimlip_train.format.report_text.normalise_report``, the rule training uses for its positives) are
  interchangeable: for an image query every copy of its report is a correct text, and for a text query every
  image that carries that same report is a correct image. Radiology archives contain many
  verbatim "no acute cardiopulmonary abnormality" reports; without this rule those pairs would count as
  failures no model could avoid.
* **AUROC** is the Mann-Whitney statistic with average ranks for ties (a tie between a positive and a
  negative counts one half). It is NaN for a class that has no positives or no negatives; macro AUROC averages
  the classes where it is defined.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from unimlip_train.format.report_text import normalise_report

RECALL_KS = (1, 5, 10)


def duplicate_groups(texts: Sequence[str]) -> np.ndarray:
    """Group id per sample; samples whose reports are the same by ``normalise_report`` share a group."""
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(normalise_report(t), len(ids)) for t in texts], dtype=np.int64)


def ranks_of_best_correct(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """1-based rank of each row's best correct column, ties counted against the query.

    ``scores`` and ``correct`` are Q x G (float, bool); every row needs at least one correct column.
    """
    if not correct.any(axis=1).all():
        raise ValueError("every query needs at least one correct candidate")
    best_correct = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    wrong_at_least_as_high = (~correct) & (scores >= best_correct)
    return 1 + wrong_at_least_as_high.sum(axis=1)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, texts: Sequence[str] | None = None,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Image->text and text->image recall@K, median ranks, mean of the recalls and chance R@1.

    Row i of ``image_emb`` and ``text_emb`` is one sample (L2-normalised embeddings, cosine similarity).
    ``texts`` enables the duplicate-report rule (see module docstring); without it only the diagonal is correct.
    Recalls are in percent, as retrieval papers report them.
    """
    n = image_emb.shape[0]
    if n == 0 or text_emb.shape[0] != n:
        raise ValueError(f"need the same non-zero number of images and texts, got {n} and {text_emb.shape[0]}")
    sims = (image_emb.double() @ text_emb.double().T).cpu().numpy()
    groups = duplicate_groups(texts) if texts is not None else np.arange(n)
    correct = groups[:, None] == groups[None, :]
    ranks = {"i2t": ranks_of_best_correct(sims, correct), "t2i": ranks_of_best_correct(sims.T, correct.T)}
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * float((r <= k).mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ranks for k in ks]))
    out["median_rank_i2t"] = float(np.median(ranks["i2t"]))
    out["median_rank_t2i"] = float(np.median(ranks["t2i"]))
    # A random ranking puts one of a query's c correct items first with probability c / n.
    out["chance_R@1"] = 100.0 * float(correct.sum(axis=1).mean() / n)
    out["num_samples"] = float(n)
    return out


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if a class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).astype(bool).ravel()
    n_pos = int(targets.sum())
    n_neg = targets.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks it spans are (end - count + 1) .. end.
    ends = np.cumsum(counts)
    avg_rank = (ends - (counts - 1) / 2.0)[inverse]
    u = avg_rank[targets].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def one_vs_rest_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p_c / (1 - p_c)) of a softmax over classes, computed without cancellation (float64).

    Monotone in each class probability, so AUROC and argmax are those of the softmax, but a confident row does
    not round to log-probability 0.0 and tie with other confident rows.
    """
    logits = logits.double()
    c = logits.shape[1]
    others = logits.unsqueeze(1).expand(-1, c, -1).masked_fill(torch.eye(c, dtype=torch.bool), -math.inf)
    return logits - torch.logsumexp(others, dim=2)


def balanced_accuracy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``target`` (a fraction; NaN when none is)."""
    recalls = [float((pred[target == c] == c).mean()) for c in range(num_classes) if (target == c).any()]
    return float(np.mean(recalls)) if recalls else math.nan


def _macro(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def single_label_metrics(scores: torch.Tensor | np.ndarray, targets: Sequence[int] | np.ndarray,
                         class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, one-vs-rest per-class and macro AUROC for N x C class scores.

    ``scores`` should be per-class log-odds (``one_vs_rest_log_odds``) or probabilities: the per-class AUROC
    ranks column c across samples, so raw similarities would ignore the other classes.
    """
    s = np.asarray(scores.detach().cpu().double() if isinstance(scores, torch.Tensor) else scores, np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if s.ndim != 2 or s.shape[0] != y.shape[0] or s.shape[1] != len(class_names):
        raise ValueError(f"scores {s.shape} do not match {y.shape[0]} targets and {len(class_names)} classes")
    if s.shape[0] == 0:
        raise ValueError("no samples to score")
    pred = s.argmax(axis=1)
    out = {"accuracy": 100.0 * float((pred == y).mean()),
           "balanced_accuracy": 100.0 * balanced_accuracy(pred, y, len(class_names))}
    per_class = [auroc(s[:, c], y == c) for c in range(len(class_names))]
    out["auroc"] = 100.0 * _macro(per_class)
    for name, value in zip(class_names, per_class):
        out[f"auroc/{name}"] = 100.0 * value
    out["num_samples"] = float(y.shape[0])
    return out


def multi_label_metrics(scores: torch.Tensor | np.ndarray, targets: np.ndarray,
                        class_names: Sequence[str]) -> dict[str, float]:
    """Per-class binary metrics for N x C scores whose sign is the decision (positive iff score > 0).

    ``accuracy`` is the mean label-wise accuracy, ``balanced_accuracy`` the mean over classes of
    (sensitivity + specificity) / 2, ``auroc`` the macro AUROC over classes with both outcomes present.
    """
    s = np.asarray(scores.detach().cpu().double() if isinstance(scores, torch.Tensor) else scores, np.float64)
    y = np.asarray(targets).astype(bool)
    if s.shape != y.shape or s.ndim != 2 or s.shape[1] != len(class_names):
        raise ValueError(f"scores {s.shape} and targets {y.shape} must both be N x {len(class_names)}")
    if s.shape[0] == 0:
        raise ValueError("no samples to score")
    pred = s > 0
    out = {"accuracy": 100.0 * float((pred == y).mean())}
    balanced, per_class = [], []
    for c, name in enumerate(class_names):
        balanced.append(balanced_accuracy(pred[:, c].astype(np.int64), y[:, c].astype(np.int64), 2))
        per_class.append(auroc(s[:, c], y[:, c]))
        out[f"auroc/{name}"] = 100.0 * per_class[-1]
    out["balanced_accuracy"] = 100.0 * _macro(balanced)
    out["auroc"] = 100.0 * _macro(per_class)
    out["num_samples"] = float(y.shape[0])
    return out
