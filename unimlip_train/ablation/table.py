"""Rows of the ablation table: a row per config and seed (a run), a row per config over its seeds (mean, sample
std and 95 % t-interval of every metric, and the paired difference to the baseline with its interval), and the
markdown rendering.

Differences are paired by seed: seed k of a config against seed k of the baseline (the same data order and
initialisation seed), so the seed-to-seed spread both share drops out of the interval.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import unimlip_train.ablation.stats as stats

# Columns of the markdown table, when present (ablation.json has every metric).
HEADLINE = ("i2t_R@1", "t2i_R@1", "mean_recall", "zeroshot/accuracy", "zeroshot/balanced_accuracy",
            "zeroshot/calibrated_balanced_accuracy", "zeroshot/auroc", "linear_probe/balanced_accuracy",
            "linear_probe/auroc")
# Row fields that are not metrics.
INFO = ("config", "seed", "status", "step", "target_steps", "terms", "weights", "seeds", "config_path",
        "run_dir", "checkpoint", "config_hash", "trained", "evaluated", "log", "card", "delta_to_baseline")
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


def find_baseline(rows: list[dict], name: Optional[str]) -> Optional[str]:
    """The baseline config: ``name`` (``--baseline``) if given, else ``clip_only`` when it is among the configs, else
    the first config whose only term is ``itc`` (CLIP), else None (no differences)."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if name:
        if name not in configs:
            raise ValueError(f"--baseline {name!r} is not one of the configs (choices: {', '.join(configs)})")
        return name
    if "clip_only" in configs:
        return "clip_only"
    return next((r["config"] for r in rows if r["terms"] == ["itc"]), None)


def add_seed_deltas(rows: list[dict], baseline: Optional[str]) -> None:
    """``delta_to_baseline`` of each seed row: the row minus the baseline's row of the same seed, every metric."""
    if baseline is None:
        return
    base = {r["seed"]: r for r in rows if r["config"] == baseline}
    keys = [k for k in metric_keys(rows) if _compared(k)]
    for row in rows:
        ref = base.get(row["seed"])
        if row["config"] == baseline or ref is None:
            continue
        row["delta_to_baseline"] = {k: row[k] - ref[k] for k in keys if _finite(row.get(k)) and _finite(ref.get(k))}


def _compared(key: str) -> bool:
    return key.rsplit("/", 1)[-1] not in NOT_COMPARED


def config_rows(seed_rows: list[dict], baseline: Optional[str]) -> list[dict]:
    """One row per config (ablation.json): for every metric M over the seeds whose run finished, the mean ``M``,
    ``M_std`` and ``M_ci95``; for rows other than the baseline, ``delta_M`` (mean of the per-seed differences to
    the baseline, paired by seed) and ``delta_M_ci95``. The seed rows themselves are the row's ``runs``."""
    by_config: dict[str, list[dict]] = {}
    for row in seed_rows:
        by_config.setdefault(row["config"], []).append(row)
    keys = metric_keys(seed_rows)
    base_runs = {r["seed"]: r for r in by_config.get(baseline, []) if r["status"] == "ok"}
    out = []
    for name, group in by_config.items():
        done = [r for r in group if r["status"] == "ok"]
        row = {"config": name, "terms": group[0]["terms"], "weights": group[0].get("weights"),
               "seeds": [r["seed"] for r in done],
               "status": "ok" if len(done) == len(group) else f"{len(done)} of {len(group)} seeds ok",
               "step": min((r["step"] for r in done), default=None), "target_steps": group[0].get("target_steps"),
               "baseline": baseline}
        for k in keys:
            values = [r.get(k) for r in done]
            ok = bool(values) and all(_finite(v) for v in values)
            row[k] = stats.mean(values) if ok else None
            row[f"{k}_std"] = stats.sample_std(values) if ok else None
            row[f"{k}_ci95"] = stats.t_interval(values) if ok else None
        if baseline is not None and name != baseline:
            pairs = [(r, base_runs[r["seed"]]) for r in done if r["seed"] in base_runs]
            row["paired_seeds"] = [r["seed"] for r, _ in pairs]
            for k in filter(_compared, keys):
                diffs = [r[k] - b[k] for r, b in pairs if _finite(r.get(k)) and _finite(b.get(k))]
                complete = bool(diffs) and len(diffs) == len(pairs)
                row[f"delta_{k}"] = stats.mean(diffs) if complete else None
                row[f"delta_{k}_ci95"] = stats.t_interval(diffs) if complete else None
        row["runs"] = group
        out.append(row)
    return out


def excludes_zero(interval: Optional[list[float]]) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _seed_cell(row: dict, key: str) -> str:
    v = row.get(key)
    if not _finite(v):
        return "–"
    delta = row.get("delta_to_baseline", {}).get(key)
    return f"{v:.2f}" + (f" ({delta:+.2f})" if delta is not None else "")


def _config_cell(row: dict, key: str) -> str:
    """``mean ± half-interval``, then ``Δ diff [low, high]`` (bold when the interval excludes 0)."""
    v = row.get(key)
    if not _finite(v):
        return "–"
    ci = row.get(f"{key}_ci95")
    cell = f"{v:.2f}" + (f" ± {(ci[1] - ci[0]) / 2:.2f}" if ci else "")
    delta, dci = row.get(f"delta_{key}"), row.get(f"delta_{key}_ci95")
    if _finite(delta):
        text = f"Δ {delta:+.2f}" + (f" [{dci[0]:+.2f}, {dci[1]:+.2f}]" if dci else "")
        cell += " " + (f"**{text}**" if excludes_zero(dci) else text)
    return cell


def markdown(rows: list[dict], baseline: Optional[str], about: list[str]) -> str:
    """Two markdown tables: one row per config (means, intervals, paired differences), then one per seed."""
    runs = [r for row in rows for r in row["runs"]]
    keys = [k for k in HEADLINE if any(_finite(r.get(k)) for r in runs)]
    lines = ["# Ablation", ""] + [f"- {line}" for line in about]
    lines.append("- Each value: the mean over the seeds that finished ± half its 95 % Student-t interval over "
                 "seeds (no interval with one seed); percentages.")
    if baseline:
        lines.append(f"- Δ: the difference to `{baseline}`, paired by seed (mean of the per-seed differences) with "
                     "its 95 % t-interval, in percentage points; **bold**: the interval excludes 0.")
    header = " | ".join(keys)
    lines += ["", f"| config | seeds | terms | step | status | {header} |", "|" + "---|" * (5 + len(keys))]
    for row in rows:
        step = "" if row.get("step") is None else str(row["step"])
        cells = [row["config"], ", ".join(map(str, row["seeds"])), " + ".join(row["terms"]), step, row["status"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells + [_config_cell(row, k) for k in keys]) + " |")
    lines += ["", "## Per seed", ""]
    if baseline:
        lines += [f"In brackets: the difference to the `{baseline}` run of the same seed.", ""]
    lines += [f"| config | seed | terms | step | status | {header} |", "|" + "---|" * (5 + len(keys))]
    for row in runs:
        step = "" if row.get("step") is None else str(row["step"])
        cells = [row["config"], str(row["seed"]), " + ".join(row["terms"]), step, row["status"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells + [_seed_cell(row, k) for k in keys]) + " |")
    return "\n".join(lines) + "\n"


def json_safe(rows: list[dict]) -> list[dict]:
    """NaN/inf -> null, so the file is strict JSON."""
    def fix(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
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
