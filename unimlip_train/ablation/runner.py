"""The local side of ``unimlip-ablate``: train one run as an ``unimlip-train`` subprocess (under torchrun with
``--nproc``), evaluate its final checkpoint, turn it into a table row, and write the table.

``args`` is ``unimlip-ablate``'s parsed command line (``unimlip_train.cli.ablate``). Whether a SLURM job still
owns a run is asked through a callable (``launch.ablation`` passes one), so this package never imports the
launcher.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import unimlip_train.ablation.table as table
from unimlip_train.ablation.evaluate import EvalSpec, evaluate_run
from unimlip_train.ablation.plan import AblationRun
from unimlip_train.ablation.table import HEADLINE


def progress(i: int, n: int, run, text: str) -> None:
    print(f"[ablate {i}/{n}] {run.label}: {text}", flush=True)


def headline(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in HEADLINE if k in metrics)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def train_command(run, nproc: int) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + ["-m", "unimlip_train.cli.train", "--config", run.config_path, "--run-dir", str(run.run_dir),
                       *run.overrides]


def train_run(run, nproc: int) -> int:
    """Train (or resume) one run as a subprocess, its output appended to RUN_DIR/train.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # The venv's bin first: DeepSpeed JIT-builds an op with the ninja on PATH (a different one rebuilds it).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = train_command(run, nproc)
    with open(run.run_dir / "train.log", "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def base_row(run) -> dict:
    return {"config": run.name, "seed": run.seed, "status": "", "step": None, "target_steps": run.cfg.train.steps,
            "terms": run.terms, "weights": run.weights, "config_path": run.config_path, "run_dir": str(run.run_dir),
            "config_hash": run.cfg.hash()}


def evaluated_row(run, checkpoint, spec, trained: bool) -> dict:
    """The row of a finished run: its metrics (cached or computed now) or the evaluation error."""
    row = {**base_row(run), "step": checkpoint.step, "checkpoint": checkpoint.path, "trained": trained}
    try:
        metrics, card, computed = evaluate_run(run.run_dir, checkpoint.path, spec)
    except (OSError, ValueError, RuntimeError) as e:
        return {**row, "status": f"eval failed: {type(e).__name__}: {e}", "evaluated": True}
    return {**row, "status": "ok", "evaluated": computed, **metrics, "card": card}


def run_locally(i: int, n: int, run, spec, args, queued_job: Callable[[AblationRun], Optional[tuple[str, str]]]) -> dict:
    """Train unless finished, then evaluate unless cached; never raises for one run's failure. ``queued_job(run)``:
    ``(job id, state)`` of a SLURM job that may still train this run (then it is left to that job), else None."""
    done = run.finished(args.force)
    trained = False
    queued = queued_job(run) if done is None else None
    if queued:
        job_id, state = queued
        progress(i, n, run, f"a SLURM job ({job_id}) is {state} for this run: not training it here")
        return {**base_row(run), "status": f"pending: job {job_id} {state}"}
    if done is None:
        ck = run.checkpoint()
        start = f"resuming from step {ck.step}" if ck else "training"
        progress(i, n, run, f"{start} to step {run.cfg.train.steps} (log: {run.run_dir / 'train.log'})")
        t0 = time.time()
        code = train_run(run, args.nproc)
        done, trained = run.finished(args.force), True
        if code != 0 or done is None:
            ck = run.checkpoint()
            why = f"training exited with {code}" if code else f"stopped at step {ck.step if ck else 0}"
            progress(i, n, run, f"FAILED: {why}; last lines of the log:\n{_log_tail(run.run_dir / 'train.log')}")
            return {**base_row(run), "status": f"failed: {why}", "step": ck.step if ck else None,
                    "log": str(run.run_dir / "train.log"), "trained": True}
        progress(i, n, run, f"trained to step {done.step} in {time.time() - t0:.0f} s; evaluating")
    else:
        progress(i, n, run, f"already finished at step {done.step}; evaluating (cached if unchanged)")
    row = evaluated_row(run, done, spec, trained)
    progress(i, n, run, f"{row['status']}" + (f": {headline(row)}" if row["status"] == "ok" else ""))
    return row


def eval_spec(args, cfg, data: str) -> EvalSpec:
    """How every row is evaluated, from ``unimlip-ablate``'s evaluation options and the first run's config."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] or list(cfg.eval.classes)
    return EvalSpec(data=os.path.abspath(args.eval_data) if args.eval_data else data,
                    split=args.eval_split or cfg.eval.split, probe_data="" if args.no_probe else data,
                    probe_split=args.probe_split, classes=classes,
                    prompts=os.path.abspath(args.prompts) if args.prompts else cfg.eval.prompts,
                    label_key=args.label_key or cfg.eval.label_key, multi_label=args.multi_label or cfg.eval.multi_label,
                    batch_size=args.eval_batch_size, workers=args.workers)


def about(args, runs, spec, baseline) -> list[str]:
    seeds = sorted({r.seed for r in runs})
    steps = sorted({r.cfg.train.steps for r in runs})
    return [f"Trained on `{runs[0].cfg.data.train}` for {', '.join(map(str, steps))} steps, seeds "
            f"{', '.join(map(str, seeds))}" + (f", {args.nproc} processes" if args.nproc > 1 else "") + ".",
            f"Evaluated on `{spec.data}` [{spec.split}]: retrieval"
            + (f"; zero-shot ({', '.join(spec.classes) or 'classes from the labels'}; prompts "
               f"`{spec.prompts or 'packaged chest_xray.yaml'}`)" + (
                   f", calibrated (`calibrated_*`: each class's logit minus its mean) on the images of "
                   f"`{spec.probe_data}` [{spec.probe_split}] without their labels, and linear probe fitted on them"
                   if spec.probe_data else "")
               + " when the samples carry labels") + ".",
            "Overrides: " + (" ".join(f"`{o}`" for o in args.overrides) if args.overrides else "none") + ".",
            f"Baseline: `{baseline}`." if baseline else "No CLIP-only config among the rows: no differences shown."]


def finish(rows: list[dict], args, runs, spec, run_root: Path, final: bool) -> str:
    """The config rows over the seed ``rows`` (statistics, paired differences), both files; returns the one-line
    JSON (printed by the caller when final)."""
    baseline = table.find_baseline(rows, args.baseline)
    table.add_seed_deltas(rows, baseline)
    configs = table.config_rows(rows, baseline)
    md = table.markdown(configs, baseline, about(args, runs, spec, baseline))
    doc = table.write(run_root, configs, md)
    if final:
        print("\n" + md, flush=True)
        print(f"wrote {run_root / 'ablation.json'} and {run_root / 'ablation.md'}", flush=True)
    return doc
