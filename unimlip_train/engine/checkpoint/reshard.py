"""Resuming at another layout (world size, ZeRO stage, precision): the consolidated state of a checkpoint
(``optimizer_state``) loaded into a freshly initialised engine, each new rank's random state, and the offline
``unimlip-checkpoint reshard``, which writes the same consolidated state as a tag for N ranks.

Loading (``load_into``, after ``deepspeed.initialize`` on the weights the tag holds): every trainable parameter's
fp32 master, ``exp_avg`` and ``exp_avg_sq`` and its group's step count, through DeepSpeed's
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` at stages 1-2 and their local twins at stage 3
(after creating the optimizer's state, which torch's Adam makes only at its first step), directly into the client
optimizer (or the 16-bit optimizer's fp32 copies) at stage 0. So the moments, master weights and steps continue
bit for bit.

Random state: new rank r takes saved rank r's (so a reshard and back, with no step between, is exact); a rank
the old layout lacked is seeded from (seed, step, rank).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from unimlip_train.data.plan import stable_seed
from unimlip_train.data.remainder import StreamView
from unimlip_train.engine.checkpoint.consolidate import engine_state
from unimlip_train.engine.checkpoint.integrity import file_records, read_state, resolve_checkpoint
from unimlip_train.engine.checkpoint.optimizer_state import OptimizerState, read_consolidated, write_consolidated
from unimlip_train.engine.checkpoint.state import (
    CONSOLIDATED,
    STATE_FILE,
    CheckpointError,
    TrainerState,
    read_rank_state,
)

_STATE_VERSION = 3  # the loader state version a view can be built from (``data.loader``)


def read_for_reshard(path: str) -> tuple[dict, Optional[OptimizerState]]:
    """(the model's fp32 state dict, its optimizer state), names as in the model, from any tag; the optimizer
    state is None for a stage-0 tag that did not record its parameter names (written before this version)."""
    state = read_state(path)
    if state.format == CONSOLIDATED:
        return read_consolidated(path)
    full, optim = engine_state(path, state)
    p = state.model_prefix
    return {k[len(p):]: v for k, v in full.items() if k.startswith(p)}, optim.renamed(p) if optim else None


def _holders(wrapper) -> list[tuple]:
    """(tensor the base optimizer steps, [(model parameter, offset in it or None)]) for every optimizer tensor;
    None: a partitioned one, set through DeepSpeed's safe_set_full_* API."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return [(hp, [(p, None) for p in lps]) for hp, lps in zip(wrapper.fp32_partitioned_groups_flat,
                                                                  wrapper.fp16_groups)]
    if hasattr(wrapper, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1, bf16 weights)
        return [(hp, [(p, None) for p in lps]) for hp, lps in zip(wrapper.fp32_groups_flat_partition,
                                                                  wrapper.bf16_groups)]
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return [(hp, [(p, None) for p in lps]) for hp, lps in zip(wrapper.single_partition_of_fp32_groups,
                                                                  wrapper.bit16_groups)]
    if hasattr(wrapper, "fp32_groups_flat"):  # stage 0, 16-bit, fused: one flat fp32 copy per group
        out = []
        for hp, lps in zip(wrapper.fp32_groups_flat, wrapper.fp16_groups):
            offsets = [0]
            for p in lps:
                offsets.append(offsets[-1] + p.numel())
            out.append((hp, list(zip(lps, offsets))))
        return out
    if hasattr(wrapper, "fp32_groups"):  # stage 0, 16-bit, unfused: an fp32 copy of each parameter
        return [(hp, [(p, 0)]) for hps, lps in zip(wrapper.fp32_groups, wrapper.fp16_groups)
                for hp, p in zip(hps, lps)]
    return [(p, [(p, 0)]) for group in wrapper.param_groups for p in group["params"]]  # stage 0, fp32


def _fresh_state(base: torch.optim.Optimizer, group: dict, hp: torch.Tensor) -> dict:
    """Zero moments in the optimizer's own format (torch's Adam keeps the step as a tensor, DeepSpeed's as an int)."""
    if isinstance(base, torch.optim.Adam):
        on_device = group.get("fused") or group.get("capturable")
        step = torch.zeros((), dtype=torch.float32, device=hp.device if on_device else "cpu")
    else:
        step = 0
    state = {"step": step, "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(hp)
    return state


@torch.no_grad()
def load_into(engine, optim: OptimizerState, model_prefix: str) -> None:
    """``optim`` (names as in the model) into ``engine``'s optimizer, any ZeRO stage: master weights, moments, steps.
    Every rank calls it; no collectives. Parameters the saved optimizer did not hold keep fresh moments."""
    from deepspeed.utils import (  # deepspeed: heavy
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    names = {id(p): n[len(model_prefix):] for n, p in engine.module.named_parameters() if n.startswith(model_prefix)}
    steps = optim.steps()
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)  # the torch optimizer that holds the state
    # (ZeRO-3 puts its flat tensors into the groups only while it steps)
    group_of = {id(t): g for g in base.param_groups for t in g["params"]}
    holders = _holders(wrapper)
    for hp, params in holders:
        group = group_of.get(id(hp))
        state = base.state[hp]
        if not state:
            state.update(_fresh_state(base, group or base.param_groups[0], hp))
        found = {steps[names[id(p)]] for p, _ in params if names.get(id(p)) in steps}
        if len(found) > 1:
            raise CheckpointError(f"parameters sharing one optimizer tensor had different step counts {found}")
        step = found.pop() if found else 0
        if torch.is_tensor(state["step"]):
            state["step"].fill_(step)
        else:
            state["step"] = step
        if group is not None and "step" in group:  # DeepSpeed's FusedAdam keeps it per group
            group["step"] = step
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the fragments to the new state
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    for hp, params in holders:
        for p, offset in params:
            name = names.get(id(p))
            if name not in optim.master:
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's slice of the zero-padded parameter
                safe_set_local_fp32_param(p, _local_slice(p, optim.master[name]))
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_local_optimizer_state(p, _local_slice(p, getattr(optim, key)[name]), key)
                continue
            if offset is None:  # ZeRO-1/2: the fragment this rank's partition holds
                safe_set_full_fp32_param(p, optim.master[name])
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, getattr(optim, key)[name], key)
                continue
            n = optim.master[name].numel()
            hp.view(-1)[offset:offset + n].copy_(optim.master[name].flatten())
            for key in ("exp_avg", "exp_avg_sq"):
                base.state[hp][key].view(-1)[offset:offset + n].copy_(getattr(optim, key)[name].flatten())


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    """ZeRO-3 keeps ``ceil(numel / world)`` elements of a parameter per rank, the last ones zero-padded (as its
    moments are: the padding never gets a gradient). DeepSpeed's full setter does not pad, so it cannot set a
    parameter whose size does not divide by the world size; this rank's padded slice goes through the local one."""
    part = param.ds_tensor.numel()
    rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
    out = torch.zeros(part, dtype=torch.float32)
    piece = full.flatten()[rank * part:(rank + 1) * part]
    out[:piece.numel()] = piece
    return out


def rank_rng(path: str, saved_world: int, rank: int, seed: int, step: int) -> dict:
    """Rank ``rank``'s random state at a layout change: saved rank ``rank``'s, else seeded from (seed, step, rank)."""
    if rank < saved_world:
        return read_rank_state(path, rank)["rng"]
    return {"seed": stable_seed(seed, "rng", step, rank) % 2**63}


def reshard(checkpoint: str, world_size: int, out: str, zero_stage: Optional[int] = None) -> str:
    """Write ``checkpoint`` as a tag for ``world_size`` ranks (and ``zero_stage``) into ``out``: the consolidated
    weights and optimizer state, the config and tokenizer, and per rank its random state and the data stream's
    view of the old layout (recut when the new one draws its first batch). ``unimlip-train --resume OUT`` takes it."""
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    path = resolve_checkpoint(checkpoint)
    state = read_state(path)
    weights, optim = read_for_reshard(path)
    if optim is None:
        raise CheckpointError(f"{path}: a stage-0 checkpoint written before this version records no names for its "
                              "optimizer state; resume it directly at the new shape instead (the moments restart)")
    if os.path.exists(out) and os.listdir(out):
        raise CheckpointError(f"{out} exists and is not empty: choose a new --out directory")
    os.makedirs(out, exist_ok=True)
    write_consolidated(out, weights, optim, {"step": state.step, "source": os.path.abspath(path)})
    shutil.copyfile(os.path.join(path, "config.yaml"), os.path.join(out, "config.yaml"))
    shutil.copytree(os.path.join(path, "tokenizer"), os.path.join(out, "tokenizer"))
    streams = [read_rank_state(path, r)["stream"] for r in range(state.world_size)]
    stream = ({"version": _STATE_VERSION, "view": StreamView.build(streams)}
              if all(s.get("version") == _STATE_VERSION for s in streams) else streams[0])
    seed = _seed(path)
    for rank in range(world_size):
        rng = rank_rng(path, state.world_size, rank, seed, state.step)
        torch.save({"stream": stream, "rng": rng}, os.path.join(out, f"trainer_rank{rank:05d}.pt"))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        shapes = json.load(f).get("param_shapes", {})
    new = TrainerState(**{**asdict(state), "world_size": world_size, "format": CONSOLIDATED,
                          "zero_stage": state.zero_stage if zero_stage is None else zero_stage,
                          "resharded_from": {"world_size": state.world_size, "zero_stage": state.zero_stage,
                                             "path": os.path.abspath(path)}})
    record = {**asdict(new), "files": file_records(out), "param_shapes": shapes}
    with open(os.path.join(out, STATE_FILE), "w", encoding="utf-8") as f:  # the completion marker, last
        json.dump(record, f, indent=1)
    return out


def _seed(path: str) -> int:
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        return int((yaml.safe_load(f) or {}).get("seed", 0))
