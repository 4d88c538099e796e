"""One fp32 state dict of the UniMlip weights from a tag, whatever ZeRO stage and world size wrote it: for a
resume on another layout, for evaluation and for export.

Stage 0 keeps the full module in rank 0's model-states file; ZeRO-1 with bf16 weights keeps the fp32 master
weights in DeepSpeed's BF16_Optimizer files, which its own consolidation refuses; every other case goes
through DeepSpeed's ``zero_to_fp32``.
"""
from __future__ import annotations

import os

import torch

from unimlip_train.distributed.quiet import CONSOLIDATION, without_lines
from unimlip_train.engine.checkpoint.integrity import read_state

_BF16_OPTIM_FILE = "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _module_states(path: str) -> dict[str, torch.Tensor]:
    """The module as rank 0's model-states file holds it (full tensors at stages 0 and 1), in fp32."""
    blob = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def _bf16_optimizer_weights(path: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a tag written by DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32
    gradient accumulation), which DeepSpeed's own consolidation refuses: every rank's flat fp32 partition,
    cut into parameters by its slice map and joined in rank order; buffers from the model states."""
    from deepspeed.utils.tensor_fragment import fragment_address  # deepspeed: heavy, imported when needed

    full, pieces = _module_states(path), {}
    rank = 0
    while os.path.isfile(file := os.path.join(path, _BF16_OPTIM_FILE.format(rank=rank))):
        with torch.serialization.safe_globals([fragment_address]):
            optim = torch.load(file, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        for flat, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
        rank += 1
    for name, parts in pieces.items():
        full[name] = torch.cat(parts).view(full[name].shape).float()
    return full


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """fp32 UniMlip weights of a tag, independent of the ZeRO stage and world size that wrote it."""
    state = read_state(path)
    if state.zero_stage == 0:
        # Stage 0 keeps the full module in rank 0's model-states file (DeepSpeed's own file format).
        full = _module_states(path)
    elif os.path.isfile(os.path.join(path, _BF16_OPTIM_FILE.format(rank=0))):
        full = _bf16_optimizer_weights(path)
    else:
        # deepspeed: heavy, imported only for a ZeRO tag (an export of a stage-0 run never loads it)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with without_lines(CONSOLIDATION):  # its progress lines, four per consolidation
            full = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if state.zero_stage == 1:  # ZeRO-1 records frozen (locked) parameters only in the module states
            full.update({k: v for k, v in _module_states(path).items() if k not in full})
    p = state.model_prefix
    return {k[len(p):]: v for k, v in full.items() if k.startswith(p)}
