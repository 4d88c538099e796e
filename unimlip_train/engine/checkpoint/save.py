"""Saving step checkpoints so that each one is complete or invisible, and pruning the old ones.

Order of a save: every rank writes its DeepSpeed shards and its rank file, the ranks agree that all of them
succeeded, then rank 0 writes ``trainer_state.json`` (with the file records ``integrity`` checks later) and only
then moves ``latest`` (temp file + os.replace). A job killed anywhere before that leaves ``latest`` on the
previous checkpoint; DeepSpeed's own ``latest`` file is never written (``save_latest=False``).

A write that fails (a full disk, a quota) fails on every rank together: every file goes through
``_GuardedWrites``, the ranks exchange what went wrong, the partial checkpoint is removed, ``latest`` is
untouched, and the message names the path and the space.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional

import torch

import unimlip_train.distributed.process_group as du
from unimlip_train.config.load import dump_yaml
from unimlip_train.config.schema import Config
from unimlip_train.engine.checkpoint.integrity import file_records, is_complete, latest_pointer, newest_complete
from unimlip_train.engine.checkpoint.state import (
    LATEST,
    STATE_FILE,
    TAG_RE,
    CheckpointWriteError,
    TrainerState,
    parameter_shapes,
    rng_state,
    tag_for,
)

# Fault injection for the "killed while writing a checkpoint" test: every rank SIGKILLs itself after its
# DeepSpeed shards are on disk at this step, before the completion barrier.
FAULT_ENV = "UNIMLIP_FAULT_KILL_DURING_SAVE"


def atomic_write(path: str, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file, fsynced, then renamed over it)."""
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
        writes.call(path, atomic_write, os.path.join(path, "config.yaml"), dump_yaml(cfg))
        record = {**asdict(state), "files": file_records(path),
                  "param_shapes": parameter_shapes(engine.module, state.model_prefix)}
        writes.call(path, atomic_write, os.path.join(path, STATE_FILE), json.dumps(record, indent=1))
        writes.call(self.dir, atomic_write, os.path.join(self.dir, LATEST), os.path.basename(path) + "\n")
        if not writes.error:
            self._prune(state.step)

    def _write_failure(self, path: str, reports: list) -> str:
        """One message, the same on every rank: which write failed and why, the space there and needed."""
        failed = next(r for r in reports if r["error"])
        need = sum(r["bytes"] for r in reports)
        free = shutil.disk_usage(self.dir).free
        reason = "no space left on device" if failed["no_space"] or free < need else failed["error"]
        latest = latest_pointer(self.dir)
        return (f"cannot write checkpoint {path} ({reason}, at {failed['path']}): it needs about {_human(need)}, "
                f"{_human(free)} is free there. The partial checkpoint was removed; latest is still "
                f"{latest or 'none'}. Free some space (or lower train.keep_checkpoints) and rerun to resume"
                f"{' from ' + latest if latest else ''}")

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep`` complete checkpoints; drop partial tags older than the newest one."""
        tags = sorted((int(m.group(1)), name) for name in os.listdir(self.dir) if (m := TAG_RE.match(name)))
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
