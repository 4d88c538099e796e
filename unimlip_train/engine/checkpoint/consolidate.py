"""One fp32 state dict of the UniMlip weights from a tag, whatever ZeRO stage, precision and world size wrote it:
for a resume on another layout, for evaluation and for export.

The trainable parameters are the optimizer's fp32 master weights (``optimizer_state``: every stage, bf16 included,
whose 16-bit module copies are only rounded from them); buffers and frozen (locked) parameters come from the
model-states files (ZeRO-3 partitions frozen parameters too: their fragments are joined). A stage-0 tag written
before the trainer recorded its optimizer's parameter names has its module weights read as they are. A resharded
tag (``reshard.py``) holds the consolidated weights already (``model.safetensors``).
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from unimlip_train.engine.checkpoint.integrity import read_state
from unimlip_train.engine.checkpoint.optimizer_state import (
    MODEL_STATES,
    WEIGHTS_FILE,
    ZERO3_MODEL_STATES,
    OptimizerState,
    load_pt,
    rank_files,
    read_optimizer_state,
)
from unimlip_train.engine.checkpoint.state import CONSOLIDATED, TrainerState


def _fp32(tensors: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _module_tensors(path: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """What the model-states files hold besides the optimizer's parameters: everything at stages 0-2 (the module
    in full), buffers and frozen parameters (joined from every rank's fragment) at stage 3; in fp32."""
    if zero_stage < 3:
        return _fp32(load_pt(os.path.join(path, MODEL_STATES))["module"])
    files = rank_files(path, (ZERO3_MODEL_STATES,))
    first = load_pt(files[0])
    out = {k: v for k, v in first["module"].items() if k in set(first["buffer_names"])}
    fragments = [load_pt(f)["frozen_param_fragments"] or {} for f in files]
    for name, shape in (first["frozen_param_shapes"] or {}).items():
        joined = torch.cat([frags[name].flatten() for frags in fragments])
        out[name] = joined[:shape.numel()].view(shape)
    return _fp32(out)


def engine_state(path: str, state: TrainerState) -> tuple[dict, OptimizerState | None]:
    """(every tensor of the TrainStep's state dict in fp32, its optimizer state), names with the engine's prefix,
    of a DeepSpeed tag; the optimizer state is None where nothing maps (see the module doc)."""
    optim = read_optimizer_state(path, state.zero_stage, state.optimizer_params)
    full = _module_tensors(path, state.zero_stage)
    if optim is not None:
        full.update(optim.master)
    return full, optim


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """fp32 UniMlip weights of a tag, independent of the ZeRO stage and world size that wrote it."""
    state = read_state(path)
    if state.format == CONSOLIDATED:
        return load_file(os.path.join(path, WEIGHTS_FILE))
    full, _ = engine_state(path, state)
    p = state.model_prefix
    return {k[len(p):]: v for k, v in full.items() if k.startswith(p)}
