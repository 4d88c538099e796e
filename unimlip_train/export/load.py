"""A trained model back in memory, for evaluation and fine-tuning: from an ``unimlip-export`` folder (safetensors;
DeepSpeed is not imported) or from a training checkpoint (consolidated to fp32 whatever ZeRO stage wrote it)."""
from __future__ import annotations

import os
from typing import Any

import yaml
from safetensors.torch import load_file

from unimlip_train.config.load import config_from_dict
from unimlip_train.config.schema import Config
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.engine.checkpoint import (
    CheckpointError,
    consolidated_state_dict,
    parameter_shapes,
    resolve_checkpoint,
    shape_differences,
)
from unimlip_train.models.build import build_model


def _build_for_eval(cfg: Config, tokenizer, weights: dict) -> Any:
    cfg.model.image.pretrained = ""  # the weights come from the checkpoint, not the original init file
    model = build_model(cfg, tokenizer)
    now = parameter_shapes(model)
    saved = {k: list(v.shape) for k, v in weights.items()}
    if saved != now:
        raise CheckpointError(f"its weights do not fit the model its config.yaml describes: "
                              f"{shape_differences(saved, now)}")
    model.load_state_dict(weights, strict=True)
    return model.eval()


def load_for_eval(path: str) -> tuple[Any, Config, Any]:
    """``(model, cfg, tokenizer)`` from an exported dir (safetensors; DeepSpeed not imported) or from a
    training checkpoint (run dir, checkpoints dir or tag dir; consolidated to fp32)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        weights = load_file(os.path.join(path, "model.safetensors"))
    else:
        path = resolve_checkpoint(path)
        weights = consolidated_state_dict(path)
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        cfg = config_from_dict(yaml.safe_load(f), source=os.path.join(path, "config.yaml"))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return _build_for_eval(cfg, tokenizer, weights), cfg, tokenizer
