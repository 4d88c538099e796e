"""Optimizer and learning-rate schedule: per-tower parameter groups, AdamW, warm-up + cosine by step.

The towers are often pre-trained and want a smaller learning rate than the fresh heads, and the temperature
is a single scalar that must not be decayed; hence four groups (each split into decay / no-decay). With
``train.layer_decay`` < 1 the tower groups are split further by depth (BEiT / MAE layer-wise decay): a
parameter in layer group ``l`` of a tower whose top group is ``L`` gets ``layer_decay ** (L + 1 - l)`` times its
tower's lr, so the top block trains at ``layer_decay`` times it and the heads above the towers at the full lr.
Locked (frozen) parameters are in no group, so the optimizer keeps no state for them. A resumed run follows
its current config's schedule (``follow_config_schedule``) or, after a layout change, a fresh one set to the
resumed step (``fast_forward``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from unimlip_train.config.schema import Config

GROUPS = ("image", "text", "head", "temperature")


def _group_of(model: nn.Module) -> dict[int, str]:
    """Map parameter id -> group name using the model seam (image_tower, text_tower, logit_scale)."""
    owner: dict[int, str] = {}
    for p in model.image_tower.parameters():
        owner[id(p)] = "image"
    for p in model.text_tower.parameters():
        owner[id(p)] = "text"
    owner[id(model.logit_scale)] = "temperature"
    return owner


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights and the temperature are not decayed (open_clip's rule). By the parameter's full
    shape: a ZeRO-3 partitioned parameter's own tensor is an empty 1-D placeholder (a resume rebuilds the groups
    after the engine exists)."""
    return len(getattr(p, "ds_shape", p.shape)) < 2 or "logit_scale" in name


def layer_scales(towers: Iterable[nn.Module], layer_decay: float) -> dict[int, float]:
    """Parameter id -> lr multiplier ``layer_decay ** (top + 1 - layer)`` within each tower (empty at 1: off)."""
    if layer_decay == 1.0:
        return {}
    scales: dict[int, float] = {}
    for tower in towers:
        ids = tower.layer_ids()
        top = max(ids.values())
        for name, p in tower.named_parameters():
            scales[id(p)] = layer_decay ** (top + 1 - ids[name])
    return scales


def param_groups(module: nn.Module, model: nn.Module, cfg: Config) -> list[dict]:
    """Parameter groups over ``module`` (e.g. the TrainStep wrapping ``model``); params outside the towers
    and the temperature are heads. Frozen parameters and empty groups are left out (ZeRO rejects empty ones).
    Within a name, groups run from the top layer down, so the first one carries the tower's own lr."""
    t = cfg.train
    lrs = {"image": t.lr_image or t.lr, "text": t.lr_text or t.lr, "head": t.lr_head or t.lr,
           "temperature": t.lr_temperature or t.lr}
    owner = _group_of(model)
    scales = layer_scales((model.image_tower, model.text_tower), t.layer_decay)
    buckets: dict[tuple[str, bool, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        group = owner.get(id(p), "head")
        decay = group != "temperature" and not _no_decay(name, p)
        buckets.setdefault((group, decay, scales.get(id(p), 1.0)), []).append(p)
    groups = []
    for group in GROUPS:
        for decay in (True, False):
            for scale in sorted({s for g, d, s in buckets if (g, d) == (group, decay)}, reverse=True):
                groups.append({"params": buckets[group, decay, scale], "name": group if decay else f"{group}_no_decay",
                               "lr": lrs[group] * scale, "lr_scale": scale,
                               "weight_decay": t.weight_decay if decay else 0.0})
    return groups


def build_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW by default; DeepSpeed FusedAdam or DeepSpeedCPUAdam on request (CPU Adam is forced
    under optimizer offload, which DeepSpeed requires)."""
    kind = "cpu_adam" if cfg.deepspeed.offload_optimizer else cfg.train.optimizer
    kw = dict(lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=1e-6, weight_decay=cfg.train.weight_decay)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam  # deepspeed: heavy, and its ops build only on request

        return FusedAdam(groups, adam_w_mode=True, **kw)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # deepspeed: heavy, and its ops build only on request

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available() or None, **kw)


@dataclass
class WarmupCosine:
    """LR factor for optimizer step ``k`` (0-based): linear warm-up to 1, then cosine down to ``min_ratio``.

    A callable object (not a lambda) so LambdaLR.state_dict can save its fields.
    """

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        progress = min(1.0, (k - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    fn = WarmupCosine(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr per named group (the decay half stands for its no-decay twin; a tower's own lr, before its
    layer-wise decay)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(g.get("name", "group").removesuffix("_no_decay"), g["lr"] / g.get("lr_scale", 1.0))
    return out


def fast_forward(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a fresh LambdaLR at ``step`` without stepping an optimizer (world-size-change resume)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def follow_config_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, groups: list[dict], cfg: Config,
                           step: int) -> None:
    """A resumed run follows *this* config's lr, warm-up, length, weight decay and betas: loading the engine
    restored the saved ones with the optimizer and scheduler state, so ``train.steps=600`` on a run saved at
    300 of 300 would otherwise train at the final lr. With an unchanged config nothing changes. ``groups`` are
    built afresh from the config (``param_groups``), in the optimizer's group order."""
    for group, fresh in zip(scheduler.optimizer.param_groups, groups):
        group.update(weight_decay=fresh["weight_decay"], betas=tuple(cfg.train.betas))
    scheduler.base_lrs = [g["lr"] for g in groups]
    scheduler.lr_lambdas = [WarmupCosine(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
                            for _ in groups]
    fast_forward(scheduler, step)


@torch.no_grad()
def clamp_parameter_(param: torch.nn.Parameter, lo: float, hi: float) -> None:
    """Clamp a parameter in place where the optimizer keeps it, so the next step starts from the clamped
    value: DeepSpeed's fp32 master fragment (ZeRO 1/2, bf16), the ZeRO-3 local partition, and the model's own
    copy. Elementwise, so each rank clamps the elements it holds and no communication is needed."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the master and of the model copy
        # deepspeed: heavy; a ZeRO-3 parameter means the engine has loaded it already
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None and local.numel():
            safe_set_local_fp32_param(param, local.clamp(lo, hi))
        param.ds_tensor.data.clamp_(lo, hi)
        param.data.clamp_(lo, hi)  # a small ("persistent") parameter stays gathered between steps
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        mapping.hp_fragment.data.clamp_(lo, hi)
    param.data.clamp_(lo, hi)
