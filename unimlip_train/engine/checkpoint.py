"""Step checkpoints that are complete or invisible, exact resume, and loading weights for evaluation.

Layout of ``run_dir/checkpoints``::

    step_0000100/               one DeepSpeed tag (model + optimizer + scheduler states, every rank's shards)
        trainer_rank00000.pt    per-rank: data-stream position and RNG states (torch.save, tensors/ints only)
        trainer_state.json      rank 0, written last: step, samples seen, world size, config hash (the marker)
        config.yaml, tokenizer/ so the tag alone can be evaluated or exported
    latest                      the tag of the newest *complete* checkpoint, replaced atomically

Order of a save: every rank writes its DeepSpeed shards and its rank file, the ranks agree that all of them
succeeded, then rank 0 writes ``trainer_state.json`` and only then moves ``latest`` (temp file + os.replace).
A job killed anywhere before that leaves ``latest`` on the previous checkpoint; DeepSpeed's own ``latest``
file is never written (``save_latest=False``).

``trainer_state.json`` also records every file of the checkpoint with its size and the model's parameter
shapes, so a checkpoint damaged later (a truncated or deleted file) is recognised before anything loads it:
``--resume auto`` falls back to the newest older intact checkpoint and says which one it skipped, an
explicit path is a one-line error. A write that fails (a full disk, a quota) fails on every rank together:
the partial checkpoint is removed, ``latest`` is untouched, and the message names the path and the space.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import yaml

from unimlip_train import distributed as du
from unimlip_train.config import Config, config_diff, config_from_dict, dump_yaml

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG_RE = re.compile(r"^step_(\d{7,})$")
# Fault injection for the "killed while writing a checkpoint" test: every rank SIGKILLs itself after its
# DeepSpeed shards are on disk at this step, before the completion barrier.
FAULT_ENV = "UNIMLIP_FAULT_KILL_DURING_SAVE"


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


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


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


def _shape_differences(saved: dict, now: dict, limit: int = 4) -> str:
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
        """Collective: every rank must call it at the same step. Raises CheckpointWriteError on every rank when
        any rank could not write its part (the partial checkpoint is then removed, ``latest`` untouched)."""
        rank = du.get_rank()
        tag = tag_for(state.step)
        path = os.path.join(self.dir, tag)
        if rank == 0 and os.path.isdir(path):
            shutil.rmtree(path)  # a partial tag left by a killed job, or one we are about to redo
        du.barrier()
        writes = _GuardedWrites()
        with writes.routing(engine):  # DeepSpeed's own collectives run to the end even when a write fails
            engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        rank_file = os.path.join(path, f"trainer_rank{rank:05d}.pt")
        writes.save({"stream": stream.state_dict(), "rng": rng_state()}, rank_file, torch.save)
        if os.environ.get(FAULT_ENV) == str(state.step):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        reports = du.all_gather_object(writes.report())  # also the barrier: every rank's part is on disk
        if not any(r["error"] for r in reports):
            if rank == 0:
                self._finish(path, engine, state, cfg, tokenizer, writes)
            reports = du.all_gather_object(writes.report())
        if any(r["error"] for r in reports):
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            du.barrier()
            raise CheckpointWriteError(self._write_failure(path, reports))
        return path

    def _finish(self, path: str, engine, state: TrainerState, cfg: Config, tokenizer, writes: "_GuardedWrites"):
        """Rank 0, once every rank's part is written: tokenizer and config, the state file with the inventory
        (the completion marker), then ``latest``, then pruning."""
        tok_dir = os.path.join(path, "tokenizer")
        writes.call(tok_dir, tokenizer.save_pretrained, tok_dir)
        writes.call(path, _atomic_write, os.path.join(path, "config.yaml"), dump_yaml(cfg))
        record = {**asdict(state), "files": _files(path),
                  "param_shapes": parameter_shapes(engine.module, state.model_prefix)}
        writes.call(path, _atomic_write, os.path.join(path, STATE_FILE), json.dumps(record, indent=1))
        writes.call(self.dir, _atomic_write, os.path.join(self.dir, LATEST), os.path.basename(path) + "\n")
        if not writes.error:
            self._prune(state.step)

    def _write_failure(self, path: str, reports: list) -> str:
        """One message, the same on every rank: which write failed and why, the space there and needed."""
        failed = next(r for r in reports if r["error"])
        need = sum(r["bytes"] for r in reports)
        free = shutil.disk_usage(self.dir).free
        reason = "no space left on device" if failed["no_space"] or free < need else failed["error"]
        latest = _pointer(self.dir)
        return (f"cannot write checkpoint {path} ({reason}, at {failed['path']}): it needs about {_human(need)}, "
                f"{_human(free)} is free there. The partial checkpoint was removed; latest is still "
                f"{latest or 'none'}. Free some space (or lower train.keep_checkpoints) and rerun to resume"
                f"{' from ' + latest if latest else ''}")

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep`` complete checkpoints; drop partial tags older than the newest one."""
        tags = sorted((int(m.group(1)), name) for name in os.listdir(self.dir) if (m := _TAG_RE.match(name)))
        complete = [(s, n) for s, n in tags if is_complete(os.path.join(self.dir, n))]
        doomed = {n for s, n in tags if s < newest and (s, n) not in complete}
        if self.keep > 0:
            doomed |= {n for _, n in complete[:-self.keep]}
        for name in doomed:
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)


class _GuardedWrites:
    """Every file a checkpoint save writes on this rank goes through here: a failure (a full disk, a quota, an
    I/O error) is recorded, the partial file removed and later writes skipped, instead of an exception that
    would leave this rank out of the collectives the other ranks are still in. ``bytes`` estimates what the
    whole save needs (what torch.save writes: every tensor storage once)."""

    def __init__(self):
        self.error, self.path, self.no_space, self.bytes = "", "", False, 0

    def call(self, path: str, fn: Callable, *args) -> None:
        if self.error:
            return
        try:
            fn(*args)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            self.error, self.path = f"{type(e).__name__}: {e}", path
            self.no_space = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(e)
            if os.path.isfile(path):
                os.remove(path)

    def save(self, state_dict: Any, path: str, writer: Callable) -> None:
        self.bytes += _storage_bytes(state_dict)
        self.call(path, writer, state_dict, path)

    @contextlib.contextmanager
    def routing(self, engine) -> Iterator[None]:
        """Route DeepSpeed's writes (its checkpoint engine, the recovery scripts it copies) through ``call``."""
        inner, copy_scripts = engine.checkpoint_engine, engine._copy_recovery_script
        engine.checkpoint_engine = _RoutedCheckpointEngine(inner, self)
        engine._copy_recovery_script = lambda save_path: self.call(save_path, copy_scripts, save_path)
        try:
            yield
        finally:
            engine.checkpoint_engine = inner
            del engine._copy_recovery_script  # the class's method again

    def report(self) -> dict:
        return {"error": self.error, "path": self.path, "no_space": self.no_space, "bytes": self.bytes}


class _RoutedCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``save`` going through ``_GuardedWrites`` (pinned DeepSpeed 0.19:
    every file of ``save_checkpoint`` but the recovery scripts is written by ``checkpoint_engine.save``)."""

    def __init__(self, inner, writes: _GuardedWrites):
        self._inner, self._writes = inner, writes

    def save(self, state_dict, path: str) -> None:
        self._writes.save(state_dict, path, self._inner.save)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _storage_bytes(obj: Any, seen: Optional[set] = None) -> int:
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_storage_bytes(v, seen) for v in obj)
    return 0


def _files(path: str) -> dict[str, int]:
    """Every file under the tag dir (relative path -> size), written into the state file as the inventory."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def is_complete(path: str) -> bool:
    """The marker is there (the save finished); says nothing about damage since (see ``damage``)."""
    return os.path.isfile(os.path.join(path, STATE_FILE))


def damage(path: str) -> str:
    """'' when the checkpoint at ``path`` is complete and every file its state records is there with the size
    it was written with; otherwise what is wrong, in a few words."""
    if not is_complete(path):
        return f"no {STATE_FILE} (a partial write, or not a checkpoint)"
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            files = json.load(f).get("files", {})
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    for rel, size in files.items():
        try:
            actual = os.path.getsize(os.path.join(path, rel))
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written (truncated or changed)"
    return ""


def _pointer(checkpoints_dir: str) -> Optional[str]:
    """The tag the ``latest`` file names, as written (not checked)."""
    try:
        with open(os.path.join(checkpoints_dir, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _tags(checkpoints_dir: str) -> list[str]:
    """Checkpoint tags (complete or not), newest step first."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = sorted(((int(m.group(1)), name) for name in os.listdir(checkpoints_dir) if (m := _TAG_RE.match(name))),
                   reverse=True)
    return [name for _, name in found]


def newest_complete(checkpoints_dir: str) -> Optional[str]:
    """The tag ``latest`` names; if that one is gone or incomplete (it was being rewritten after a resume
    from an older tag), the complete tag with the highest step. A complete tag that is damaged (``damage``)
    is passed over for the next older one, with a message naming it (rank 0); CheckpointError when every
    complete tag is damaged, rather than silently starting over."""
    latest = _pointer(checkpoints_dir)
    order = ([latest] if latest else []) + [t for t in _tags(checkpoints_dir) if t != latest]
    broken = []
    for tag in order:
        path = os.path.join(checkpoints_dir, tag)
        if not is_complete(path):
            continue
        problem = damage(path)
        if not problem:
            if broken and du.is_main():
                print(f"checkpoint {broken[0][0]} is damaged ({broken[0][1]}); using the newest older intact "
                      f"checkpoint {path}" + "".join(f"; also skipped {p} ({why})" for p, why in broken[1:]),
                      flush=True)
            return path
        broken.append((path, problem))
    if broken:
        raise CheckpointError("no intact checkpoint in " + checkpoints_dir + ": " + "; ".join(
            f"{p}: {why}" for p, why in broken) + ". Use --resume none to start over (or restore the files)")
    return None


def resolve_checkpoint(path: str) -> str:
    """A run dir or its ``checkpoints`` dir (the newest intact tag in it, see ``newest_complete``), or a tag
    dir, which must be intact -> the tag dir. CheckpointError (a ValueError) otherwise."""
    if not is_complete(path):
        for candidate in (path, os.path.join(path, "checkpoints")):
            if os.path.isdir(candidate) and (found := newest_complete(candidate)):
                return os.path.normpath(found)
    problem = damage(path) if os.path.isdir(path) else "no such directory"
    if problem:
        raise CheckpointError(f"{path}: cannot resume from it: {problem}")
    return os.path.normpath(path)


def _state_record(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def read_state(path: str) -> TrainerState:
    """The tag's trainer state. Its ``config_hash`` is that of the tag's ``config.yaml`` as this version reads
    it (new keys at their defaults), so a config key added since the tag was written does not make the same
    experiment look like another; the hash stored at save time is the fallback."""
    known = {f.name for f in fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in _state_record(path).items() if k in known})
    config = os.path.join(path, "config.yaml")
    try:
        with open(config, encoding="utf-8") as f:
            state.config_hash = config_from_dict(yaml.safe_load(f) or {}, source=config).hash()
    except (OSError, yaml.YAMLError, ValueError, TypeError):
        pass
    return state


def check_compatible(path: str, cfg: Config, model: torch.nn.Module) -> None:
    """Raise CheckpointError listing the config keys that differ when ``model`` (built from ``cfg``, before
    loading anything) has parameters of other names or shapes than the checkpoint at ``path``. Checkpoints
    written before shapes were recorded pass (their load fails as it always did)."""
    saved = _state_record(path).get("param_shapes")
    now = parameter_shapes(model)
    if not saved or saved == now:
        return
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        saved_cfg = yaml.safe_load(f) or {}
    model_keys = ("model.", "loss.", "data.in_chans", "data.image_size")
    diff = {k: v for k, v in config_diff(saved_cfg, cfg.to_dict()).items() if k.startswith(model_keys)}
    keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) or \
        "none of the model keys (the tokenizer's vocabulary or the model code changed)"
    raise CheckpointError(f"checkpoint {path} holds another model than this config builds. Config keys that "
                          f"differ: {keys}. Parameters: {_shape_differences(saved, now)}. Resume with the "
                          "checkpoint's model settings, or train into a new run dir (or --resume none)")


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
    now = parameter_shapes(model)
    saved = {k: list(v.shape) for k, v in weights.items()}
    if saved != now:
        raise CheckpointError(f"its weights do not fit the model its config.yaml describes: "
                              f"{_shape_differences(saved, now)}")
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
