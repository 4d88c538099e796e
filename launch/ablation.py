"""``unimlip-ablate`` from start to table: every run of the ablation trained and evaluated here one after another
(``unimlip_train.ablation.runner``), or the unfinished ones submitted as one SLURM job array (``--submit``,
each task an ``AblationJob``) and the table built from what is done.

It lives in the launcher because both ways need the runs' submission records: a run that a SLURM job may still
be training is never trained here too, and a rerun of the same command only completes the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from launch import slurm
from launch.jobs import AblationJob
from launch.options import preflight, ranks, resources
from launch.runs import SUBMISSIONS, check_run_dir, record_submission, submissions, write_config
from launch.slurm import LaunchError
from unimlip_train.ablation.plan import plan_runs
from unimlip_train.ablation.runner import (
    base_row,
    eval_spec,
    evaluated_row,
    finish,
    headline,
    progress,
    run_locally,
    train_command,
)
from unimlip_train.config.origins import ConfigError


def _last_job(run) -> Optional[dict]:
    """The run's newest ``unimlip-ablate --submit`` record in its submissions.jsonl, if any."""
    if not (run.run_dir / SUBMISSIONS).is_file():
        return None
    records = [r for r in submissions(run.run_dir) if r.get("kind") == "ablate"]
    return records[-1] if records else None


def _job_state(record: Optional[dict]) -> Optional[str]:
    """The SLURM state of a run's last ablation job while it may still run, else None."""
    if not record or record.get("cluster") != "slurm":
        return None
    state = slurm.query_states([record["job_id"]])[record["job_id"]].state
    return None if state in slurm.TERMINAL_STATES or state == "UNKNOWN" else state


def queued_job(run) -> Optional[tuple[str, str]]:
    """``(job id, state)`` of the run's last ablation job while SLURM may still run it, else None (what the local
    runner asks before it trains a run itself)."""
    record = _last_job(run)
    state = _job_state(record)
    return (record["job_id"], state) if state else None


def submit_array(runs: list, spec, args, run_root: Path) -> tuple[dict, int]:
    """Submit the runs that are neither finished nor queued as one array; returns ``{run_dir: job id}``."""
    todo = [r for r in runs if r.finished(args.force) is None and _job_state(_last_job(r)) is None]
    if not todo:
        return {}, 0
    tasks, gpus = ranks(args)
    folder, res = run_root / "slurm" / "%j", resources(args, "unimlip-ablate", tasks, gpus)
    if args.dry_run:
        print(f"# ---- array of {len(todo)} tasks (not submitted) ----")
        print(slurm.sbatch_script(folder, res, array_size=len(todo)), end="")
        for k, r in enumerate(todo):
            print(f"# task {k}: {r.label} -> {r.run_dir} (config hash {r.cfg.hash()})")
        return {}, len(todo)
    executor = preflight(args, folder, res)
    for r in todo:
        write_config(r.run_dir, r.cfg)
    jobs = executor.submit_array([AblationJob(r.cfg.to_dict(), str(r.run_dir), args.max_requeues, spec) for r in todo])
    ids = {}
    for r, job in zip(todo, jobs):
        stdout, stderr = slurm.log_paths(job)
        record_submission(r.run_dir, {"kind": "ablate", "job_id": str(job.job_id), "cluster": args.cluster,
                                      "stdout": stdout, "stderr": stderr, "config_hash": r.cfg.hash()})
        ids[str(r.run_dir)] = str(job.job_id)
        print(f"[ablate] {r.label}: job_id {job.job_id} (log {stdout})", flush=True)
    if args.cluster == "local" or args.wait:
        _wait(jobs, args.cluster)
    return ids, len(todo)


def _wait(jobs: list, cluster: str) -> None:
    """Until every job has ended (local jobs: their results; SLURM: sacct states, requeues included)."""
    if cluster == "local":
        for job in jobs:
            try:
                job.results()
            except Exception as e:  # the table reports the run as failed; the log has the traceback
                print(f"[ablate] job {job.job_id} failed: {str(e).splitlines()[-1] if str(e) else e}", flush=True)
        return
    ids = [str(j.job_id) for j in jobs]
    while True:
        states = slurm.query_states(ids)
        active = [j for j, s in states.items() if s.state not in slurm.TERMINAL_STATES and s.state != "UNKNOWN"]
        if not active:
            return
        print(f"[ablate] waiting for {len(active)} of {len(ids)} array tasks", flush=True)
        time.sleep(30)


def tabulate_submitted(runs: list, spec, args, submitted: dict) -> list[dict]:
    """Rows after a submission: finished runs evaluated (the job's cache, else here), the others' job states."""
    rows = []
    for i, run in enumerate(runs, 1):
        done = run.finished(args.force)
        if done is not None:
            row = evaluated_row(run, done, spec, trained=str(run.run_dir) in submitted)
        else:
            record = _last_job(run)
            state = _job_state(record)
            ck = run.checkpoint()
            if state:
                status = f"pending: job {record['job_id']} {state}"
            elif str(run.run_dir) in submitted and not args.dry_run:
                status = f"submitted: job {submitted[str(run.run_dir)]}"
            elif args.dry_run:
                status = "not trained (dry run)"
            else:
                status = f"failed: job {record['job_id'] if record else '?'} ended before step {run.cfg.train.steps}"
            row = {**base_row(run), "status": status, "step": ck.step if ck else None}
        progress(i, len(runs), run, row["status"] + (f": {headline(row)}" if row["status"] == "ok" else ""))
        rows.append(row)
    return rows


def ablate(args: argparse.Namespace) -> int:
    """``unimlip-ablate`` for its parsed arguments (``unimlip_train.cli.ablate.parse_args``): plan and check every
    run, then train and evaluate them here one after another, or submit the unfinished ones as one array
    (``--submit``), and write the table. Returns the exit status (0 every row ok, 1 not, 2 bad config)."""
    run_root = Path(args.run_root).resolve()
    data = os.path.abspath(args.data)
    try:
        names = list(dict.fromkeys(Path(c).stem for c in args.configs))
        if args.baseline and args.baseline not in names:
            raise ConfigError(f"--baseline {args.baseline!r} is not among the configs (choices: {', '.join(names)})")
        runs = plan_runs(args.configs, data, run_root, args.steps, args.seeds, args.overrides)
        for run in runs:
            check_run_dir(run.run_dir, run.cfg, args.force)
        spec = eval_spec(args, runs[0].cfg, data)
    except (ConfigError, LaunchError, FileNotFoundError) as e:
        print(f"unimlip-ablate: error: {e}", file=sys.stderr)
        return 2
    run_root.mkdir(parents=True, exist_ok=True)
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in runs}))
    print(f"[ablate] {len(runs)} runs ({len(args.configs)} configs, seeds {seeds}) in {run_root}", flush=True)

    if args.dry_run and not args.submit:
        for run in runs:
            state = "finished" if run.finished(args.force) else "to train"
            print(f"# {run.label} ({state}): {' '.join(train_command(run, args.nproc))}")
        return 0
    if args.submit:
        try:
            submitted, count = submit_array(runs, spec, args, run_root)
        except LaunchError as e:
            print(f"unimlip-ablate: error: {e}", file=sys.stderr)
            return 2
        if args.dry_run:
            return 0
        print(f"[ablate] submitted {count} runs" if count else "[ablate] nothing to submit", flush=True)
        rows = tabulate_submitted(runs, spec, args, submitted)
    else:
        rows = []
        for i, run in enumerate(runs, 1):
            rows.append(run_locally(i, len(runs), run, spec, args, queued_job))
            finish(rows, args, runs, spec, run_root, final=False)  # a partial table survives an interruption
    doc = finish(rows, args, runs, spec, run_root, final=True)
    print(doc, flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1
