"""Step checkpoints that are complete or invisible, exact resume, and loading weights for evaluation.

Layout of ``run_dir/checkpoints``::

    step_0000100/               one DeepSpeed tag (model + optimizer + scheduler states, every rank's shards)
        trainer_rank00000.pt    per-rank: data-stream position and RNG states (torch.save, tensors/ints only)
        trainer_state.json      rank 0, written last: step, samples seen, world size, config hash (the marker)
        config.yaml, tokenizer/ so the tag alone can be evaluated or exported
    latest                      the tag of the newest *complete* checkpoint, replaced atomically

Order of a save: every rank writes its DeepSpeed shards and its rank file, a barrier proves all ranks are
done, then rank 0 writes ``trainer_state.json`` and only then moves ``latest`` (temp file + os.replace).
A job killed anywhere before that leaves ``latest`` on the previous checkpoint; DeepSpeed's own ``latest``
file is never written (``save_latest=False``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import yaml

from unimlip_train import distributed as du
from unimlip_train.config import Config, config_from_dict, dump_yaml

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG_RE = re.compile(r"^step_(\d{7,})$")
# Fault injection for the "killed while writing a checkpoint" test: every rank SIGKILLs itself after its
# DeepSpeed shards are on disk at this step, before the completion barrier.
FAULT_ENV = "UNIMLIP_FAULT_KILL_DURING_SAVE"


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


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, finds and prunes the step checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep = keep
        os.makedirs(self.dir, exist_ok=True)

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None."""
        return newest_complete(self.dir)

    def save(self, engine, state: TrainerState, stream, cfg: Config, tokenizer) -> str:
        """Collective: every rank must call it at the same step."""
        rank = du.get_rank()
        tag = tag_for(state.step)
        path = os.path.join(self.dir, tag)
        if rank == 0 and os.path.isdir(path):
            shutil.rmtree(path)  # a partial tag left by a killed job, or one we are about to redo
        du.barrier()
        engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        rank_file = os.path.join(path, f"trainer_rank{rank:05d}.pt")
        torch.save({"stream": stream.state_dict(), "rng": rng_state()}, rank_file + ".tmp")
        os.replace(rank_file + ".tmp", rank_file)
        if os.environ.get(FAULT_ENV) == str(state.step):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        du.barrier()
        if rank == 0:
            tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
            _atomic_write(os.path.join(path, "config.yaml"), dump_yaml(cfg))
            _atomic_write(os.path.join(path, STATE_FILE), json.dumps(asdict(state), indent=1))
            _atomic_write(os.path.join(self.dir, LATEST), tag + "\n")
            self._prune(state.step)
        du.barrier()
        return path

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep`` complete checkpoints; drop partial tags older than the newest one."""
        tags = sorted((int(m.group(1)), name) for name in os.listdir(self.dir) if (m := _TAG_RE.match(name)))
        complete = [(s, n) for s, n in tags if is_complete(os.path.join(self.dir, n))]
        doomed = {n for s, n in tags if s < newest and (s, n) not in complete}
        if self.keep > 0:
            doomed |= {n for _, n in complete[:-self.keep]}
        for name in doomed:
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def newest_complete(checkpoints_dir: str) -> Optional[str]:
    """The tag ``latest`` names; if that one is gone or incomplete (it was being rewritten after a resume
    from an older tag), the complete tag with the highest step."""
    pointer = os.path.join(checkpoints_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(checkpoints_dir, f.read().strip())
        if is_complete(path):
            return path
    if not os.path.isdir(checkpoints_dir):
        return None
    tags = sorted((int(m.group(1)), name) for name in os.listdir(checkpoints_dir) if (m := _TAG_RE.match(name))
                  and is_complete(os.path.join(checkpoints_dir, name)))
    return os.path.join(checkpoints_dir, tags[-1][1]) if tags else None


def resolve_checkpoint(path: str) -> str:
    """A run dir, its ``checkpoints`` dir, or a tag dir -> the complete tag dir (ValueError otherwise)."""
    if not is_complete(path):
        for candidate in (path, os.path.join(path, "checkpoints")):
            if os.path.isdir(candidate) and (found := newest_complete(candidate)):
                path = found
                break
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (no {STATE_FILE}; a partial write, or not a "
                         "checkpoint / run directory)")
    return os.path.normpath(path)


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return TrainerState(**json.load(f))


def read_rank_state(path: str, rank: int) -> dict:
    return torch.load(os.path.join(path, f"trainer_rank{rank:05d}.pt"), map_location="cpu", weights_only=True)


def load_engine(engine, path: str) -> None:
    """Model, optimizer and scheduler states from a tag written at the same world size."""
    load_path, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")


# ----------------------------------------------------------------------------------------------------
# Consolidated weights (export, evaluation, world-size change)
# ----------------------------------------------------------------------------------------------------


_BF16_OPTIM_FILE = "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _module_states(path: str) -> dict[str, torch.Tensor]:
    """The module as rank 0's model-states file holds it (full tensors at stages 0 and 1), in fp32."""
    blob = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def _bf16_optimizer_weights(path: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a tag written by DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32
    gradient accumulation), which DeepSpeed's own consolidation refuses: every rank's flat fp32 partition,
    cut into parameters by its slice map and joined in rank order; buffers from the model states."""
    from deepspeed.utils.tensor_fragment import fragment_address

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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if state.zero_stage == 1:  # ZeRO-1 records frozen (locked) parameters only in the module states
            full.update({k: v for k, v in _module_states(path).items() if k not in full})
    p = state.model_prefix
    return {k[len(p):]: v for k, v in full.items() if k.startswith(p)}


def _build_for_eval(cfg: Config, tokenizer, weights: dict) -> Any:
    from unimlip_train.models import build_model

    cfg.model.image.pretrained = ""  # the weights come from the checkpoint, not the original init file
    model = build_model(cfg, tokenizer)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def load_for_eval(path: str) -> tuple[Any, Config, Any]:
    """``(model, cfg, tokenizer)`` from an exported dir (safetensors; DeepSpeed not imported) or from a
    training checkpoint (run dir, checkpoints dir or tag dir; consolidated to fp32)."""
    from unimlip_train.data.tokenizer import load_tokenizer

    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors.torch import load_file

        weights = load_file(os.path.join(path, "model.safetensors"))
    else:
        path = resolve_checkpoint(path)
        weights = consolidated_state_dict(path)
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        cfg = config_from_dict(yaml.safe_load(f), source=os.path.join(path, "config.yaml"))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return _build_for_eval(cfg, tokenizer, weights), cfg, tokenizer


def export(checkpoint: str, out: str) -> str:
    """Write ``model.safetensors`` (consolidated fp32) + ``config.yaml`` + ``tokenizer/`` into ``out``."""
    from safetensors.torch import save_file

    path = resolve_checkpoint(checkpoint)
    weights = consolidated_state_dict(path)
    os.makedirs(out, exist_ok=True)
    # Clones: tied weights share storage, which safetensors refuses to serialise twice.
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"),
              metadata={"source": os.path.abspath(path), "step": str(read_state(path).step)})
    shutil.copyfile(os.path.join(path, "config.yaml"), os.path.join(out, "config.yaml"))
    shutil.copytree(os.path.join(path, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    return out
