"""The run directory's launcher bookkeeping: which config it belongs to, and every job submitted for it.

``submissions.jsonl`` (one JSON object per submission) is what ``unimlip-submit status`` reads, so a run's
jobs can be found again from any machine that sees the run directory, long after the shell that submitted
them is gone.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from launch.slurm import LaunchError
from unimlip_train.config.load import config_diff, config_from_dict, dump_yaml
from unimlip_train.config.origins import ConfigError

SUBMISSIONS = "submissions.jsonl"


def check_run_dir(run_dir: Path, cfg, force: bool) -> None:
    """Refuse a run directory whose ``config.yaml`` describes another model/objective, unless ``force``.

    The comparison is ``Config.hash()``, which ignores bookkeeping such as ``run_dir``; the error lists the
    keys that differ so the user can tell a typo from a deliberate change.
    """
    path = run_dir / "config.yaml"
    if not path.is_file() or force:
        return
    try:
        with open(path, encoding="utf-8") as f:
            old_dict = yaml.safe_load(f) or {}
        old_hash = config_from_dict(old_dict, source=str(path)).hash()
    except (yaml.YAMLError, ConfigError, TypeError) as e:
        raise LaunchError(f"run dir {run_dir} has a config.yaml this version cannot read ({e}); "
                          "use another --run-dir, or --force to reuse it") from None
    if old_hash == cfg.hash():
        return
    diff = config_diff(old_dict, cfg.to_dict())
    changed = [k for k in diff if k != "run_dir"]
    shown = ", ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in changed[:8])
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    raise LaunchError(f"run dir {run_dir} belongs to another config (hash {old_hash}, yours {cfg.hash()}; "
                      f"{shown}{more}). Use a new --run-dir, or --force to continue this run with the new config")


def write_config(run_dir: Path, cfg) -> None:
    """Claim the run dir for ``cfg`` at submission time (the trainer rewrites the same file when it starts)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, run_dir / "config.yaml")


def record_submission(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
    with open(run_dir / SUBMISSIONS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def submissions(run_dir: Path) -> list[dict]:
    path = run_dir / SUBMISSIONS
    if not path.is_file():
        raise LaunchError(f"no {SUBMISSIONS} in {run_dir}: nothing was submitted for this run dir")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise LaunchError(f"{path}:{n}: not JSON") from None
    return out
