"""Rows of the ablation table: one per config and seed, a mean row per config with several seeds, the
difference of every metric to the baseline (CLIP-only) row, and the markdown rendering.

The baseline of a seed row is the baseline config's row of the same seed (a paired comparison); the baseline
of a mean row is the baseline's mean row.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

# Columns of the markdown table, when present (ablation.json has every metric).
HEADLINE = ("i2t_R@1", "t2i_R@1", "mean_recall", "zeroshot/accuracy", "zeroshot/balanced_accuracy",
            "zeroshot/auroc", "linear_probe/balanced_accuracy", "linear_probe/auroc")
# Row fields that are not metrics.
INFO = ("config", "seed", "status", "step", "target_steps", "terms", "weights", "seeds", "config_path",
        "run_dir", "checkpoint", "config_hash", "trained", "evaluated", "log", "card", "delta_to_baseline")
MEAN = "mean"
# Counts and settings among the metrics: tabulated and averaged, but a difference to the baseline means nothing.
NOT_COMPARED = ("num_samples", "skipped", "num_train", "num_test", "l2", "chance_R@1")


def metric_keys(rows: list[dict]) -> list[str]:
    """Every metric any row has, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update({k: None for k, v in row.items() if k not in INFO and isinstance(v, (int, float))
                     and not isinstance(v, bool)})
    return list(keys)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_rows(rows: list[dict]) -> list[dict]:
    """Seed rows, each config's followed by its mean over the seeds that finished (configs with > 1 seed)."""
    out: list[dict] = []
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    keys = metric_keys(rows)
    for name, group in by_config.items():
        out += group
        if len(group) < 2:
            continue
        done = [r for r in group if r["status"] == "ok"]
        mean = {"config": name, "seed": MEAN, "seeds": [r["seed"] for r in done], "terms": group[0]["terms"],
                "status": "ok" if len(done) == len(group) else f"{len(done)} of {len(group)} seeds ok",
                "step": min((r["step"] for r in done), default=None)}
        for k in keys:
            values = [r.get(k) for r in done]
            mean[k] = sum(values) / len(values) if values and all(_finite(v) for v in values) else None
        out.append(mean)
    return out


def find_baseline(rows: list[dict], name: Optional[str]) -> Optional[str]:
    """The baseline config: ``name`` if given, else the first config whose only term is ``itc`` (CLIP)."""
    if name:
        if not any(r["config"] == name for r in rows):
            raise ValueError(f"--baseline {name!r} is not one of the configs ({', '.join(sorted({r['config'] for r in rows}))})")
        return name
    return next((r["config"] for r in rows if r["terms"] == ["itc"]), None)


def add_deltas(rows: list[dict], baseline: Optional[str]) -> None:
    """``delta_to_baseline``: row minus the baseline row of the same seed (or mean), for every metric."""
    if baseline is None:
        return
    base = {r["seed"]: r for r in rows if r["config"] == baseline}
    keys = [k for k in metric_keys(rows) if k.rsplit("/", 1)[-1] not in NOT_COMPARED]
    for row in rows:
        ref = base.get(row["seed"])
        if row["config"] == baseline or ref is None:
            continue
        row["delta_to_baseline"] = {k: row[k] - ref[k] for k in keys if _finite(row.get(k)) and _finite(ref.get(k))}


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if not _finite(v):
        return "–"
    delta = row.get("delta_to_baseline", {}).get(key)
    return f"{v:.2f}" + (f" ({delta:+.2f})" if delta is not None else "")


def markdown(rows: list[dict], baseline: Optional[str], about: list[str]) -> str:
    """A markdown table: one row per config and seed, mean rows in bold, differences to the baseline."""
    keys = [k for k in HEADLINE if any(_finite(r.get(k)) for r in rows)]
    lines = ["# Ablation", ""] + [f"- {line}" for line in about]
    if baseline:
        lines.append(f"- In brackets: the difference to the `{baseline}` row of the same seed (mean rows: to its "
                     "mean), in percentage points.")
    lines += ["", "| config | seed | terms | step | status | " + " | ".join(keys) + " |",
              "|" + "---|" * (5 + len(keys))]
    for row in rows:
        seed = f"**{MEAN}**" if row["seed"] == MEAN else str(row["seed"])
        name = f"**{row['config']}**" if row["seed"] == MEAN else row["config"]
        step = "" if row.get("step") is None else str(row["step"])
        cells = [name, seed, " + ".join(row["terms"]), step, row["status"]] + [_cell(row, k) for k in keys]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def json_safe(rows: list[dict]) -> list[dict]:
    """NaN/inf -> null, so the file is strict JSON."""
    def fix(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v
    return [{k: fix(v) for k, v in row.items()} for row in rows]


def write(run_root: Path, rows: list[dict], md: str) -> str:
    """Write ``ablation.json`` and ``ablation.md`` (each atomically); returns the one-line JSON."""
    doc = json.dumps(json_safe(rows))
    for name, text in (("ablation.json", json.dumps(json_safe(rows), indent=1) + "\n"), ("ablation.md", md)):
        tmp = run_root / f"{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, run_root / name)
    return doc
