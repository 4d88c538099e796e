"""The outputs of a finished sharding run: ``index.json``, ``errors.jsonl`` and the audit summary in the index.

Why: ``index.json`` is what training, ``verify`` and evaluation cards read (per split: sample counts, and per
shard its name, samples, bytes and sha256; the options that shaped the bytes; the tool and its arguments). It
is written last, atomically, so its presence means the run finished. ``errors.jsonl`` lists every skipped row
and dropped study view with the reason. Unless ``--no-audit``, the finished set is audited for duplicates and
cross-split leaks (``data_prep.audit``) and the counts go into the index.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep import audit
from data_prep.options import WriterOptions
from unimlip_train import __version__

TOOL_NAME = "unimlip-shard"


def audit_summary(out: Path, done: dict[str, list[dict]], progress: bool) -> dict:
    """The within-set audit of the finished shards, as index.json keeps it (counts, cross-split leaks)."""
    problems: list[str] = []  # none in shards this run has just written
    samples = [s for split, entries in done.items() for e in entries if e["name"]
               for s in audit.read_shard(str(out / e["name"]), ".", split, problems)]
    result = audit.audit([samples])
    summary = {k: v for k, v in result["summary"].items() if k != "examples"}
    summary["cross_split"] = [f for f in result["findings"] if f["leak"]][:audit.EXAMPLES]
    return summary


def build_index(done: dict[str, list[dict]], plan_errors: list[dict], options: WriterOptions, source: str,
                args_record: dict) -> dict:
    """The index of the journalled shards of every split (``done``) and the rows skipped on the way."""
    splits = {}
    for split, entries in done.items():
        shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries if e["name"]]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    recorded = plan_errors + [err for es in done.values() for e in es for err in e["errors"]]
    dropped = sum(1 for err in recorded if err.get("dropped_view"))
    return {
        "format": "unimlip-shards/1",
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(sh["bytes"] for s in splits.values() for sh in s["shards"]),
        "errors": len(recorded) - dropped,  # rows skipped
        "dropped_views": dropped,  # images of study samples that were left out (the sample was kept)
        "options": options.content(),
        "tool": {"name": TOOL_NAME, "version": __version__, "command": source, "args": args_record},
    }


def write_outputs(out: Path, index: dict, plan_errors: list[dict], done: dict[str, list[dict]]) -> None:
    """``errors.jsonl`` then ``index.json`` (last: its presence means the run finished), both atomically."""
    lines = [json.dumps(e, ensure_ascii=False) for e in plan_errors]
    lines += [json.dumps(err, ensure_ascii=False) for es in done.values() for e in es for err in e["errors"]]
    for name, text in (("errors.jsonl", "".join(line + "\n" for line in lines)),
                       ("index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
