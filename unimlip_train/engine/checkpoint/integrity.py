"""Which checkpoint to trust: the file records a save leaves, complete versus damaged tags, the newest intact
one, and what a tag's state and config say (reading them checks nothing is loaded into the wrong model).

A tag is *complete* when its ``trainer_state.json`` exists (rank 0 writes it last); it is *intact* when, in
addition, every file that state records is still there with the size it was written with. ``--resume auto``
falls back from a damaged tag to the newest older intact one, saying which it skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Optional

import torch
import yaml

import unimlip_train.distributed.process_group as du
from unimlip_train.config.load import config_diff, config_from_dict
from unimlip_train.config.schema import Config
from unimlip_train.engine.checkpoint.state import (
    LATEST,
    STATE_FILE,
    TAG_RE,
    CheckpointError,
    TrainerState,
    parameter_shapes,
    shape_differences,
)


def file_records(path: str) -> dict[str, int]:
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


def latest_pointer(checkpoints_dir: str) -> Optional[str]:
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
    found = sorted(((int(m.group(1)), name) for name in os.listdir(checkpoints_dir) if (m := TAG_RE.match(name))),
                   reverse=True)
    return [name for _, name in found]


def newest_complete(checkpoints_dir: str, announce: bool = True) -> Optional[str]:
    """The tag ``latest`` names; if that one is gone or incomplete (it was being rewritten after a resume
    from an older tag), the complete tag with the highest step. A complete tag that is damaged (``damage``)
    is passed over for the next older one, with a message naming it (rank 0, ``announce``); CheckpointError when every
    complete tag is damaged, rather than silently starting over."""
    latest = latest_pointer(checkpoints_dir)
    order = ([latest] if latest else []) + [t for t in _tags(checkpoints_dir) if t != latest]
    broken = []
    for tag in order:
        path = os.path.join(checkpoints_dir, tag)
        if not is_complete(path):
            continue
        problem = damage(path)
        if not problem:
            if broken and announce and du.is_main():
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
                          f"differ: {keys}. Parameters: {shape_differences(saved, now)}. Resume with the "
                          "checkpoint's model settings, or train into a new run dir (or --resume none)")
