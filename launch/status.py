"""``unimlip-submit status``: the jobs of a run dir (from its ``submissions.jsonl``), their SLURM states (and why
a pending one waits), the shape of the training's last launch and the progress the run dir itself shows,
optionally waiting until every job has ended."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from launch import slurm
from launch.pending import why_pending
from launch.runs import submissions
from unimlip_train.engine.world import describe_launch, read_world


def _progress(run_dir: Path) -> str:
    """Training progress from the run dir itself (works whatever the job state says)."""
    parts = []
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        parts.append(f"latest checkpoint {latest.read_text().strip()}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text(encoding="utf-8").splitlines()
        if lines:
            try:
                last = json.loads(lines[-1])
                parts.append(f"last logged step {last.get('step')} loss {last.get('loss', float('nan')):.4f}")
            except (json.JSONDecodeError, TypeError, ValueError):
                pass
    return "; ".join(parts)


def _job_ids(records: list[dict]) -> list[str]:
    ids = []
    for r in records:
        if r.get("cluster") != "slurm":
            continue
        n = int(r.get("array_size", 0) or 0)
        ids += [f"{r['job_id']}_{i}" for i in range(n)] if n else [str(r["job_id"])]
        if r.get("merge_job_id"):
            ids.append(str(r["merge_job_id"]))
    return ids


def show_status(args: argparse.Namespace) -> int:
    """``unimlip-submit status``: print the run dir's jobs and progress (``--wait``: until they end; exit 1 when
    one did not complete or the wait timed out)."""
    run_dir = Path(args.run_dir).resolve()
    records = submissions(run_dir)
    ids = _job_ids(records)
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        states = slurm.query_states(ids) if ids else {}
        # UNKNOWN (no accounting, or gone from the queue) is not waited on: it may never change.
        pending = [j for j, s in states.items() if s.state not in slurm.TERMINAL_STATES and s.state != "UNKNOWN"]
        if not args.wait or not pending or (deadline is not None and time.time() > deadline):
            break
        time.sleep(2)
    print(f"run dir: {run_dir}")
    kinds = {str(r["job_id"]): (r["kind"], r.get("time", "")) for r in records}
    kinds.update({str(r["merge_job_id"]): ("merge", r.get("time", "")) for r in records if r.get("merge_job_id")})
    why = why_pending([j for j, s in states.items() if s.state == "PENDING"])
    for j, s in states.items():
        kind, submitted = kinds.get(j.split("_")[0], ("?", ""))
        restarts = f" requeued {s.requeues}x" if s.requeues else ""
        print(f"  {j:<14} {kind:<6} {s.state:<12} elapsed {s.elapsed or '-':<10} "
              f"exit {s.exit_code or '-':<6}{restarts}  submitted {submitted}")
        if j in why:
            print(f"  {'':<14} waiting: {why[j]}")
    for r in records:
        if r.get("cluster") == "local":
            print(f"  {r['job_id']:<14} {r.get('kind', '?'):<6} (local run)  {r.get('time', '')}")
    if (world := read_world(str(run_dir))) is not None:
        print(f"last {describe_launch(world, str(run_dir))}")
    if (progress := _progress(run_dir)):
        print(f"progress: {progress}")
    if records:
        print(f"logs: {records[-1].get('stdout')}")
    if args.wait:
        if pending:
            print(f"timed out waiting for: {', '.join(pending)}", file=sys.stderr)
            return 1
        return 0 if all(s.state == "COMPLETED" for s in states.values()) else 1
    return 0
