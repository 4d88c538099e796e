"""What a checkpoint adds to DeepSpeed's files: the names and markers, the trainer state, each rank's data position
and RNG states, and the parameter shapes a damaged or foreign checkpoint is recognised by.

The rest of the ``checkpoint`` package builds on these: ``save`` writes them, ``integrity`` checks and reads them
back, ``consolidate`` turns a tag into one fp32 state dict.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

LATEST = "latest"
STATE_FILE = "trainer_state.json"
#: ``TrainerState.format`` of a tag DeepSpeed wrote, and of one holding consolidated tensors (``reshard.py``)
DEEPSPEED, CONSOLIDATED = "deepspeed", "consolidated"
TAG_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that is damaged, missing, or made for another model; the message says which and why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (raised on every rank together; nothing partial is left)."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class TrainerState:
    """What a checkpoint adds to DeepSpeed's: counters and provenance (rank 0's JSON file)."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    world_size: int = 1
    zero_stage: int = 0
    config_hash: str = ""
    model_prefix: str = "model."  # where the UniMlip weights sit inside the TrainStep state dict
    rollbacks: int = 0  # loss-spike rollbacks so far (engine.health.rollback)
    rollback_skipped: int = 0  # samples read, then skipped by those rollbacks
    loss_history: list = field(default_factory=list)  # the spike guard's window of recent normal losses
    # the names of the optimizer's parameters, group by group, in its order (stage 0 keeps its state by index)
    optimizer_params: list = field(default_factory=list)
    format: str = DEEPSPEED  # DeepSpeed's files, or consolidated ones (``unimlip-checkpoint reshard``)
    resharded_from: dict = field(default_factory=dict)  # a consolidated tag: the layout and tag it came from


def parameter_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    """Shapes of everything ``module.state_dict()`` holds (ZeRO-3 partitioned parameters by their full
    shape), for the names that start with ``prefix`` (which is removed)."""
    out = {}
    for mod_name, mod in module.named_modules():
        base = f"{mod_name}." if mod_name else ""
        tensors = [(n, list(getattr(p, "ds_shape", p.shape))) for n, p in mod.named_parameters(recurse=False)]
        tensors += [(n, list(b.shape)) for n, b in mod.named_buffers(recurse=False)
                    if b is not None and n not in mod._non_persistent_buffers_set]
        for name, shape in tensors:
            if (base + name).startswith(prefix):
                out[(base + name)[len(prefix):]] = shape
    return out


def shape_differences(saved: dict, now: dict, limit: int = 4) -> str:
    """The first ``limit`` differences between two ``parameter_shapes`` records, in a few words each."""
    lines = [f"{k}: {saved[k]} in the checkpoint, {now[k]} now" for k in sorted(saved.keys() & now.keys())
             if saved[k] != now[k]]
    lines += [f"{k} only in the checkpoint" for k in sorted(saved.keys() - now.keys())]
    lines += [f"{k} only in the model now" for k in sorted(now.keys() - saved.keys())]
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


# ----------------------------------------------------------------------------------------------------
# RNG state (as tensors and ints so torch.load(weights_only=True) can read it back)
# ----------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """A saved ``rng_state()``, or ``{"seed": s}`` (a rank a layout change added: every generator seeded)."""
    if "seed" in state:
        random.seed(state["seed"])
        np.random.seed(state["seed"] % 2**32)
        torch.manual_seed(state["seed"])
        return
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Reading a rank's part back (exact resume at the same world size)
# ----------------------------------------------------------------------------------------------------


def read_rank_state(path: str, rank: int) -> dict:
    return torch.load(os.path.join(path, f"trainer_rank{rank:05d}.pt"), map_location="cpu", weights_only=True)


def load_engine(engine, path: str) -> None:
    """Model, optimizer and scheduler states from a tag written at the same world size."""
    load_path, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
