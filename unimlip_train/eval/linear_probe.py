"""Linear probe: multinomial logistic regression on frozen image embeddings (full batch, L-BFGS, float64).

The L2 strength is chosen on a validation split by balanced accuracy (ties go to the stronger penalty), then the
classifier is refitted on train + validation and scored once on the test split, as in CLIP's linear-probe
protocol. Without a validation split, one is carved from train by whole groups (patients). Features are
standardised with the fitting set's statistics. Everything is deterministic on CPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import metrics
from .groups import carve_groups

# Penalty grid (multiplies 0.5 * ||W||^2 / N-sample mean loss); wide enough for a few hundred to a few
# hundred thousand samples.
L2_GRID = tuple(float(x) for x in np.logspace(-6, 1, 8))


def carve_validation(targets: np.ndarray, fraction: float = 0.2,
                     groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split of train indices into (fit, validation) by whole groups
    (``eval.groups.carve_groups``); without ``groups`` every sample is its own group."""
    groups = [str(i) for i in range(len(targets))] if groups is None else groups
    return carve_groups(list(np.asarray(targets).tolist()), groups, fraction)


def _standardise(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = fit.mean(dim=0), fit.std(dim=0, unbiased=False).clamp_min(1e-8)
    return [(x - mean) / std for x in (fit, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D x C) and bias (C) minimising mean cross-entropy + 0.5 * l2 * ||W||^2."""
    x, y = x.double(), y.long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                 class_names: Sequence[str], val_x: torch.Tensor | None = None, val_y: np.ndarray | None = None,
                 l2_grid: Sequence[float] = L2_GRID, train_groups: Sequence[str] | None = None) -> dict[str, float]:
    """Select L2 on validation (carved from train by ``train_groups`` when ``val_x`` is None), refit on
    train+val, score test.

    Returns accuracy / balanced_accuracy (percent) on test, the chosen ``l2`` and the validation balanced
    accuracy it reached, and the split sizes.
    """
    train_x, test_x = train_x.double().cpu(), test_x.double().cpu()
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    if val_x is None:
        fit_idx, val_idx = carve_validation(train_y, groups=train_groups)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[fit_idx], train_y[fit_idx]
    val_x, val_y = val_x.double().cpu(), np.asarray(val_y, np.int64)
    if len(np.unique(train_y)) < 2 or len(val_y) == 0 or len(test_y) == 0:
        raise ValueError("linear probe needs at least two classes in train and non-empty validation and test sets")
    c = len(class_names)
    ty, vy = torch.from_numpy(train_y), torch.from_numpy(val_y)
    fx, vx = _standardise(train_x, val_x)
    best_l2, best_score = l2_grid[0], -1.0
    for l2 in sorted(l2_grid, reverse=True):
        w, b = fit_logistic(fx, ty, c, l2)
        score = metrics.balanced_accuracy((vx @ w + b).argmax(dim=1).numpy(), vy.numpy(), len(class_names))
        if score > best_score:
            best_l2, best_score = l2, score
    all_x, all_y = torch.cat([train_x, val_x]), torch.cat([ty, vy])
    ax, sx = _standardise(all_x, test_x)
    w, b = fit_logistic(ax, all_y, c, best_l2)
    test_scores = metrics.one_vs_rest_log_odds(sx @ w + b)
    out = metrics.single_label_metrics(test_scores, test_y, class_names)
    out.update({"l2": best_l2, "val_balanced_accuracy": 100.0 * best_score,
                "num_train": float(len(all_y)), "num_test": float(len(test_y))})
    return out
