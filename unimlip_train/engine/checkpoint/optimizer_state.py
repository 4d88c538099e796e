"""Adam's state of a checkpoint as full per-parameter tensors, whatever ZeRO stage, precision and world size wrote
it: fp32 master weights, ``exp_avg`` and ``exp_avg_sq`` by parameter name, and each group's step and
hyperparameters. One format for three uses: loading a checkpoint at another layout (``reshard.load_into``), the
offline ``unimlip-checkpoint reshard`` and ``unimlip-export --optimizer`` (``write_consolidated``).

Where DeepSpeed 0.19 keeps them:
* stage 0: rank 0's model-states file, the client optimizer's state by parameter index (fp32), or the unfused
  16-bit optimizer's state over its per-parameter fp32 copies (``fp32_groups``); the names come from the
  ``optimizer_params`` the trainer records (``TrainerState``);
* ZeRO-1/2 (and the BF16_Optimizer of ZeRO-1 with bf16): each rank's flat fp32 partition per group, its state
  over that partition, and ``param_slice_mappings``: where each parameter's fragment sits in it (a parameter's
  fragments follow each other in rank order);
* ZeRO-3: each rank holds ``ceil(numel / world)`` elements of every parameter (padded), concatenated per group
  in ``param_shapes`` order (as ``deepspeed/utils/zero_to_fp32.py`` reads them).
Rank files are read one at a time (memory-mapped) into the full tensors, so the peak is about the three full
fp32 copies plus one rank's file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
_OPTIM_FILES = ("zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
_KEYS = ("master", "exp_avg", "exp_avg_sq")
_HYPER = ("name", "lr", "lr_scale", "betas", "eps", "weight_decay")


@dataclass
class OptimizerState:
    """``groups``: per optimizer group, its hyperparameters (``_HYPER``), ``step`` and ``params`` (names); the
    other fields map a trainable parameter's name to a full fp32 tensor."""

    groups: list = field(default_factory=list)
    master: dict = field(default_factory=dict)
    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)

    def steps(self) -> dict[str, int]:
        """Parameter name -> the step count of its group."""
        return {name: g["step"] for g in self.groups for name in g["params"]}

    def renamed(self, prefix: str) -> "OptimizerState":
        """Names without the engine's ``prefix`` (as in the model's own state dict)."""
        cut = {k: {n[len(prefix):]: v for n, v in getattr(self, k).items() if n.startswith(prefix)} for k in _KEYS}
        groups = [{**g, "params": [n[len(prefix):] for n in g["params"] if n.startswith(prefix)]} for g in self.groups]
        return OptimizerState(groups, **cut)


@contextlib.contextmanager
def deepspeed_globals() -> Iterator[None]:
    """The few DeepSpeed classes its checkpoint files pickle, allowed for ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # deepspeed: heavy, only here
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def zero_stage_member(cls, name: str) -> ZeroStageEnum:
        """Some Python versions (3.11.2 here, not 3.11.7) pickle an Enum member as ``getattr(ZeroStageEnum,
        'optimizer_states')``: that call, allowed for this enum's members only (``builtins.getattr`` stays refused)."""
        if cls is not ZeroStageEnum or name not in ZeroStageEnum.__members__:
            raise pickle.UnpicklingError(f"refusing getattr({getattr(cls, '__name__', cls)!r}, {name!r})")
        return ZeroStageEnum[name]

    allowed = [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler, (zero_stage_member, "builtins.getattr")]
    with torch.serialization.safe_globals(allowed):
        yield


def load_pt(path: str) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped, without unpickling anything but tensors and the classes above."""
    with deepspeed_globals():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def rank_files(path: str, patterns: tuple) -> list[str]:
    """``path``'s files of the first pattern that rank 0 has, for ranks 0, 1, ... while they exist."""
    for pattern in patterns:
        files = []
        while os.path.isfile(file := os.path.join(path, pattern.format(rank=len(files)))):
            files.append(file)
        if files:
            return files
    return []


def _hyper(group: dict, step) -> dict:
    out = {k: (list(group[k]) if k == "betas" else group[k]) for k in _HYPER if k in group}
    return {**out, "step": int(step)}


def read_optimizer_state(path: str, zero_stage: int, optimizer_params: list) -> Optional[OptimizerState]:
    """The optimizer state of DeepSpeed tag ``path`` (names as the engine has them, with its prefix); None for a
    stage-0 tag written before the trainer recorded ``optimizer_params``, which nothing maps."""
    if zero_stage == 0:
        return _stage0(path, optimizer_params)
    files = rank_files(path, _OPTIM_FILES)
    stage3 = zero_stage == 3
    states = load_pt(os.path.join(path, ZERO3_MODEL_STATES.format(rank=0) if stage3 else MODEL_STATES))
    return _partitioned(files, states["param_shapes"], stage3)


def _stage0(path: str, names: list) -> Optional[OptimizerState]:
    """Stage 0: the client optimizer (fp32) or the unfused 16-bit optimizer, by parameter index."""
    blob = load_pt(os.path.join(path, MODEL_STATES))
    optim, module = blob["optimizer"], blob["module"]
    if not names or optim is None:
        return None
    masters = [p for g in optim["fp32_groups"] for p in g] if "fp32_groups" in optim else None
    torch_sd = optim.get("optimizer_state_dict", optim)
    out, index = OptimizerState(), 0
    for group, group_names in zip(torch_sd["param_groups"], names):
        steps = set()
        for idx, name in zip(group["params"], group_names):
            st = torch_sd["state"][idx]
            out.master[name] = (masters[index] if masters is not None else module[name]).float().clone()
            out.exp_avg[name], out.exp_avg_sq[name] = st["exp_avg"].float().clone(), st["exp_avg_sq"].float().clone()
            steps.add(int(st["step"]))
            index += 1
        out.groups.append({**_hyper(group, max(steps)), "params": list(group_names)})
    return out


def _partitioned(files: list, shapes: list, stage3: bool) -> OptimizerState:
    """ZeRO 1-3: every rank's flat partitions (and their Adam state) into full tensors, one rank file at a time."""
    full_shapes = {name: tuple(shape) for group in shapes for name, shape in group.items()}
    numel = {name: math.prod(shape) for name, shape in full_shapes.items()}
    out = OptimizerState()
    for key in _KEYS:
        setattr(out, key, {name: torch.empty(n, dtype=torch.float32) for name, n in numel.items()})
    filled = dict.fromkeys(numel, 0)
    for rank, file in enumerate(files):
        sd = load_pt(file)["optimizer_state_dict"]
        torch_sd = sd["optimizer_state_dict"] if stage3 else sd["base_optimizer_state"]
        flats = sd["fp32_flat_groups"] if stage3 else sd["single_partition_of_fp32_groups"]
        sub = 0  # the flat partitions in order: one per group (ZeRO-3: one per sub-group of a large group)
        for group in torch_sd["param_groups"]:
            names = []
            for idx in group["params"]:
                state = torch_sd["state"][idx]
                sources = {"master": flats[sub], "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
                if stage3:
                    pieces = _zero3_pieces(shapes[sub], len(files), rank)
                else:  # a parameter's fragments follow each other in rank order
                    pieces = ((n, f.start, f.numel, filled[n]) for n, f in sd["param_slice_mappings"][sub].items())
                for name, start, count, at in pieces:
                    for key, flat in sources.items():
                        getattr(out, key)[name][at:at + count] = flat[start:start + count]
                    filled[name] += count
                names += list(shapes[sub])
                sub += 1
            if rank == 0:
                out.groups.append({**_hyper(group, state["step"]), "params": names})
        del sd, torch_sd, flats
    short = [name for name, n in numel.items() if filled[name] != n]
    if short:
        raise ValueError(f"the optimizer partitions in {os.path.dirname(files[0])} do not cover {short[:3]}")
    for key in _KEYS:
        setattr(out, key, {name: t.view(full_shapes[name]) for name, t in getattr(out, key).items()})
    return out


def _zero3_pieces(group_shapes: dict, world: int, rank: int) -> Iterator[tuple]:
    """(name, start in the rank's flat partition, count, offset in the full parameter) of one ZeRO-3 group."""
    start = 0
    for name, shape in group_shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / world)
        yield name, start, max(0, min(part, n - rank * part)), rank * part
        start += part


# ----------------------------------------------------------------------------------------------------
# The consolidated files (``unimlip-export --optimizer``, a resharded tag)
# ----------------------------------------------------------------------------------------------------


def write_consolidated(out: str, weights: dict, state: OptimizerState, metadata: Optional[dict] = None) -> None:
    """``model.safetensors`` (every tensor of the model, fp32 master weights for the trainable ones),
    ``optimizer.safetensors`` (``NAME.exp_avg``, ``NAME.exp_avg_sq``) and ``optimizer.json`` (the groups)."""
    os.makedirs(out, exist_ok=True)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    # Clones: tied weights share storage, which safetensors refuses to serialise twice.
    save_file({k: v.detach().clone().contiguous() for k, v in {**weights, **state.master}.items()},
              os.path.join(out, WEIGHTS_FILE), metadata=meta)
    moments = {f"{name}.{key}": getattr(state, key)[name].contiguous() for name in state.exp_avg
               for key in ("exp_avg", "exp_avg_sq")}
    save_file(moments, os.path.join(out, OPTIMIZER_FILE), metadata=meta)
    with open(os.path.join(out, OPTIMIZER_JSON), "w", encoding="utf-8") as f:
        json.dump({"groups": state.groups, **(metadata or {})}, f, indent=1)


def read_consolidated(path: str) -> tuple[dict, OptimizerState]:
    """(every tensor of the model, its optimizer state) from ``write_consolidated``'s files."""
    weights = load_file(os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, OPTIMIZER_JSON), encoding="utf-8") as f:
        groups = json.load(f)["groups"]
    moments = load_file(os.path.join(path, OPTIMIZER_FILE))
    names = [n for g in groups for n in g["params"]]
    return weights, OptimizerState(groups, {n: weights[n] for n in names},
                                   {n: moments[f"{n}.exp_avg"] for n in names},
                                   {n: moments[f"{n}.exp_avg_sq"] for n in names})
