"""The fine-tuning loop: AdamW with the pre-training schedule (linear warm-up, cosine decay), one validation score
per epoch, and the best epoch's weights kept (model selection on the validation split, never on test)."""
from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from unimlip_train.engine.optim import WarmupCosine, layer_scales


def param_groups(model: nn.Module, towers: Iterable[nn.Module], lr: float, lr_head: float, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """Towers at ``lr`` (times their layer-wise decay), everything else (heads, fusion) at ``lr_head``; biases
    and norms undecayed; frozen parameters left out."""
    towers = list(towers)
    in_tower = {id(p) for t in towers for p in t.parameters()}
    scales = layer_scales(towers, layer_decay)
    buckets: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            base = lr * scales.get(id(p), 1.0) if id(p) in in_tower else lr_head
            buckets.setdefault((base, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": base, "weight_decay": weight_decay if decay else 0.0}
            for (base, decay), ps in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def train_epochs(model: nn.Module, groups: list[dict], epochs: int, steps_per_epoch: int,
                 batches: Callable[[int], Iterable], loss_fn: Callable[[object], torch.Tensor],
                 validate: Callable[[], float], clip_grad: float = 1.0) -> list[dict]:
    """Train ``epochs`` epochs of ``batches(epoch)``; after each, ``validate()`` (model in eval mode, no grad) scores
    it and the best epoch's weights are restored at the end (ties: the earlier epoch). Returns per-epoch logs."""
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(max(1, total // 10), total, 0.0))
    trainable = [p for g in groups for p in g["params"]]
    best_score, best_state, history = -math.inf, None, []
    for epoch in range(epochs):
        model.train()
        losses = []
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                   leave=False, dynamic_ncols=True, file=sys.stderr)
        for batch in bar:
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trainable, clip_grad)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        model.eval()
        with torch.no_grad():
            score = float(validate())
        history.append({"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)), "val": score})
        print(f"epoch {epoch + 1}/{epochs}: train loss {history[-1]['loss']:.4f}, validation {score:.2f}",
              file=sys.stderr, flush=True)
        if score > best_score or best_state is None:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return history
