"""What a checkpoint tag holds, in a few lines and one JSON record (``unimlip-checkpoint inspect``): its step and
samples, the layout that wrote it (ranks, ZeRO stage, precision, loader units), whether it is intact, its format
(DeepSpeed's files or consolidated ones), the data epoch in progress, and the optimizer's groups and steps."""
from __future__ import annotations

import json
import os

import torch
import yaml

from unimlip_train.engine.checkpoint.integrity import damage, read_state
from unimlip_train.engine.checkpoint.optimizer_state import OPTIMIZER_JSON
from unimlip_train.engine.checkpoint.state import CONSOLIDATED, STATE_FILE, read_rank_state


def _stream_summary(path: str, world: int) -> dict:
    """The loader units of rank 0's state (or the pending view of an older layout) and the epoch in progress."""
    try:
        stream = read_rank_state(path, 0)["stream"]
    except (OSError, RuntimeError, KeyError) as e:
        return {"stream_error": f"{type(e).__name__}: {e}"}
    if "view" in stream:
        view = stream["view"]
        units, layout = view["units"], view["layout"]
        return {"epoch": min(c["epoch"] for c in units), "stream_layout": [layout["world_size"], layout["workers"]],
                "stream_pending": True, "stream_version": stream["version"]}
    epochs = []
    for rank in range(world):
        try:
            epochs += [c["epoch"] for c in read_rank_state(path, rank)["stream"]["cursors"]]
        except (OSError, RuntimeError, KeyError):
            pass
    return {"epoch": min(epochs, default=None), "stream_layout": [stream.get("world_size"), stream.get("workers")],
            "stream_pending": False, "stream_version": stream.get("version")}


def describe(path: str) -> dict:
    """The record of tag ``path`` (``intact`` False, with ``damage``, when files are missing or truncated)."""
    problem = damage(path)
    state = read_state(path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        record = json.load(f)
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    files = record.get("files", {})
    out = {"path": os.path.abspath(path), "step": state.step, "samples_seen": state.samples_seen,
           "world_size": state.world_size, "zero_stage": state.zero_stage,
           "precision": cfg.get("deepspeed", {}).get("precision"), "format": state.format,
           "intact": not problem, "damage": problem, "config_hash": state.config_hash,
           "files": len(files), "bytes": sum(files.values()), "parameters": len(record.get("param_shapes", {})),
           "elements": sum(int(torch.Size(s).numel()) for s in record.get("param_shapes", {}).values())}
    if state.format == CONSOLIDATED:
        out["resharded_from"] = state.resharded_from
        with open(os.path.join(path, OPTIMIZER_JSON), encoding="utf-8") as f:
            groups = json.load(f)["groups"]
        out["optimizer_groups"] = [{"name": g.get("name"), "params": len(g["params"]), "step": g["step"]}
                                   for g in groups]
    if not problem:
        out.update(_stream_summary(path, state.world_size))
    return out


def lines(record: dict) -> list[str]:
    """A few human-readable lines of ``describe``'s record (the JSON line follows them)."""
    out = [f"checkpoint {record['path']}: step {record['step']}, {record['samples_seen']} samples seen, epoch "
           f"{record.get('epoch')} in progress",
           f"written by {record['world_size']} ranks, ZeRO {record['zero_stage']}, {record['precision']}; "
           f"{record['format']} format; {record['parameters']} tensors, {record['elements']} elements",
           f"{record['files']} files, {record['bytes'] / 2**20:.1f} MiB: "
           + ("intact" if record["intact"] else f"DAMAGED ({record['damage']})")]
    if record.get("resharded_from"):
        src = record["resharded_from"]
        out.append(f"resharded from {src['world_size']} ranks / ZeRO {src['zero_stage']} ({src['path']})")
    if record.get("stream_pending"):
        out.append(f"data stream: the view of {record['stream_layout'][0]} ranks x {record['stream_layout'][1]} "
                   "workers, recut when training resumes")
    return out
