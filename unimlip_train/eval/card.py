"""The provenance card every ``unimlip-eval`` / ``unimlip-finetune`` result carries: which checkpoint (path and
step), config, data (sha256 of its index.json and the split used), prompt file, sample count, seed and tool
version produced it, so a published number can be traced back and reproduced. The same card is written beside
any ``--out`` file (``card-NAME``).
"""
from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open

from unimlip_train import __version__
from unimlip_train.eval.zeroshot import DEFAULT_PROMPTS
from unimlip_train.export import read_state, resolve_checkpoint
from unimlip_train.format.shards import sha256_file


def checkpoint_identity(path: str) -> dict[str, Any]:
    """``{"checkpoint": absolute path, "step": training step}`` of a run dir, checkpoint tag or export folder."""
    exported = os.path.join(path, "model.safetensors")
    if os.path.isfile(exported):
        with safe_open(exported, framework="pt") as f:
            meta = f.metadata() or {}
        step = meta.get("step")
        return {"checkpoint": os.path.abspath(path), "step": int(step) if step is not None else None,
                "exported_from": meta.get("source")}
    tag = resolve_checkpoint(path)
    return {"checkpoint": os.path.abspath(tag), "step": read_state(tag).step}


def index_of(source: str) -> str | None:
    """The index.json describing a shard source (a directory holding one, or the file itself), if any."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "index.json")):
        return os.path.join(source, "index.json")
    return source if source.endswith(".json") and os.path.isfile(source) else None


def data_identity(source: str, splits: dict[str, str]) -> dict[str, Any]:
    """The data part of a card: path, sha256 of its index.json (None for a bare shard pattern), the splits used
    (role -> split name or how it was made, e.g. ``{"test": "val"}``)."""
    index = index_of(source)
    return {"path": os.path.abspath(source) if os.path.exists(source) else source,
            "index_sha256": sha256_file(index) if index else None, "splits": dict(splits)}


def build_card(tool: str, checkpoint: str, cfg, data: dict[str, Any], samples: Any, seed: int | None,
               prompts: str | None = None) -> dict[str, Any]:
    """The card of one result. ``prompts``: the prompt file used ('' = the packaged one), None when none is."""
    card: dict[str, Any] = {"tool": tool, "version": __version__, **checkpoint_identity(checkpoint),
                            "config_hash": cfg.hash(), "data": data, "samples": samples, "seed": seed}
    if prompts is not None:
        path = prompts or str(DEFAULT_PROMPTS)
        card["prompts"] = {"path": os.path.abspath(path), "sha256": sha256_file(path)}
    return card


def card_path(out: str) -> str:
    """Where the card of a result goes: ``DIR/card.json`` for an output folder, ``card-NAME`` beside a file
    (a prefix, so globs for the results, e.g. ``retrieval-*.json``, do not pick the cards up)."""
    if os.path.isdir(out):
        return os.path.join(out, "card.json")
    folder, name = os.path.split(out)
    return os.path.join(folder, f"card-{name}")


def write_card(out: str, card: dict[str, Any]) -> str:
    path = card_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return path
