"""``unimlip-ablate``: the Uni-Mlip ablation table in one command.

Trains every config (x every seed) on the same shards, one after another here (``unimlip-train``
subprocesses, under torchrun with ``--nproc``) or as one SLURM job array (``--submit``), evaluates every final
checkpoint the same way (retrieval; zero-shot and a linear probe when the eval shards carry labels) and writes
``RUN_ROOT/ablation.json`` (one object per config and seed, plus a mean row per config over its seeds) and
``RUN_ROOT/ablation.md`` (the table, with each metric's difference to the CLIP-only row).

Rerunning the same command trains nothing that is finished and re-evaluates only checkpoints that changed;
an interrupted or failed run resumes from its newest checkpoint. The last stdout line is ablation.json's list
as one line of JSON. Exit status: 0 every row ok, 1 some row failed or is still pending, 2 bad arguments or
config (before anything trains).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EPILOG = """examples:
  unimlip-ablate --configs configs/ablations/*.yaml --data shards/ --run-root runs/ablation --steps 300
  unimlip-ablate --configs configs/ablations/clip_only.yaml configs/ablations/all.yaml --data shards/ \\
      --run-root runs/abl --seeds 0,1 --classes normal,pneumonia model.tokenizer=tok/ data.num_workers=1
  unimlip-ablate --configs configs/ablations/*.yaml --data /data/shards --run-root runs/abl --submit \\
      --partition gpu --gpus-per-node 8 --time 12:00:00 --wait

Overrides (key.sub=value) may stand anywhere on the line and apply to every config, after the config file
and after what --data/--steps/--seeds set. Runs go to RUN_ROOT/<config name>/seed<k> (training log:
train.log there). --data is trained on (its 'train' split); --eval-data (default: --data) is evaluated on
its --eval-split; the linear probe is fitted on --data's --probe-split. Metrics are percentages."""


def build_parser() -> argparse.ArgumentParser:
    from launch.submit import _add_slurm_arguments

    p = argparse.ArgumentParser(
        prog="unimlip-ablate", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="unimlip-ablate --configs YAML [YAML ...] --data SHARDS --run-root DIR [options] [key.sub=value ...]")
    p.add_argument("--configs", nargs="+", required=True, metavar="YAML",
                   help="ablation configs, e.g. configs/ablations/*.yaml (the file stem names the row)")
    p.add_argument("--data", required=True, help="training shards: dir, index.json or pattern")
    p.add_argument("--run-root", required=True, metavar="DIR", help="where the runs and the tables go")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every config (default: each config's)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, each config trained once per seed, plus a mean row (default: "
                        "the config's seed)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run (torchrun) (default 1)")
    p.add_argument("--force", action="store_true",
                   help="reuse run dirs written by a different config (continue them with the new one)")
    p.add_argument("--baseline", default="",
                   help="config name the differences are taken to (default: the config whose only term is itc)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default="", help="evaluation shards (default: --data)")
    e.add_argument("--eval-split", default="", help="split of --eval-data to evaluate (default: the config's eval.split)")
    e.add_argument("--probe-split", default="train", help="split of --data the linear probe is fitted on (default train)")
    e.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    e.add_argument("--classes", default="",
                   help="comma-separated zero-shot / probe classes (default: the config's eval.classes, else every "
                        "label some eval sample carries alone)")
    e.add_argument("--prompts", default="", help="zero-shot prompt YAML (default: the config's eval.prompts, else the "
                                                 "packaged chest X-ray prompts)")
    e.add_argument("--label-key", default="", help="metadata field with the labels (default: the config's eval.label_key)")
    e.add_argument("--multi-label", action="store_true", help="multi-label zero-shot (finding vs 'no finding')")
    e.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    e.add_argument("--workers", type=int, default=None, help="evaluation data loader workers (default: the config's)")
    s = p.add_argument_group("SLURM (--submit; the resources below are unimlip-submit train's)")
    s.add_argument("--submit", action="store_true",
                   help="train (and evaluate) the unfinished runs as one SLURM job array, then tabulate what is "
                        "done; rerun the same command later to complete the table")
    s.add_argument("--wait", action="store_true", help="with --submit: wait for the array, then tabulate")
    s.add_argument("--max-requeues", type=int, default=20, help="with --submit: requeues per task (default 20)")
    _add_slurm_arguments(p, ranks=True)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options plus ``overrides``: every ``key.sub=value`` token, wherever it stands (also among --configs)."""
    from unimlip_train.ablation.plan import is_override

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not is_override(a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [c for c in args.configs if is_override(c)] + extra
    args.configs = [c for c in args.configs if not is_override(c)]
    if not args.configs:
        parser.error("--configs: no config file given")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    try:
        args.seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) != len(args.seeds)):
        parser.error("--seeds: give distinct integers, e.g. 0,1")
    return args


def _progress(i: int, n: int, run, text: str) -> None:
    print(f"[ablate {i}/{n}] {run.label}: {text}", flush=True)


def _summary(metrics: dict) -> str:
    from unimlip_train.ablation.table import HEADLINE

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
    from unimlip_train.ablation.evaluate import evaluate_run

    row = {**base_row(run), "step": checkpoint.step, "checkpoint": checkpoint.path, "trained": trained}
    try:
        metrics, card, computed = evaluate_run(run.run_dir, checkpoint.path, spec)
    except (OSError, ValueError, RuntimeError) as e:
        return {**row, "status": f"eval failed: {type(e).__name__}: {e}", "evaluated": True}
    return {**row, "status": "ok", "evaluated": computed, **metrics, "card": card}


def run_locally(i: int, n: int, run, spec, args) -> dict:
    """Train unless finished, then evaluate unless cached; never raises for one run's failure."""
    done = run.finished(args.force)
    trained = False
    record = _last_job(run) if done is None else None
    if state := _job_state(record):
        _progress(i, n, run, f"a SLURM job ({record['job_id']}) is {state} for this run: not training it here")
        return {**base_row(run), "status": f"pending: job {record['job_id']} {state}"}
    if done is None:
        ck = run.checkpoint()
        start = f"resuming from step {ck.step}" if ck else "training"
        _progress(i, n, run, f"{start} to step {run.cfg.train.steps} (log: {run.run_dir / 'train.log'})")
        t0 = time.time()
        code = train_run(run, args.nproc)
        done, trained = run.finished(args.force), True
        if code != 0 or done is None:
            ck = run.checkpoint()
            why = f"training exited with {code}" if code else f"stopped at step {ck.step if ck else 0}"
            _progress(i, n, run, f"FAILED: {why}; last lines of the log:\n{_log_tail(run.run_dir / 'train.log')}")
            return {**base_row(run), "status": f"failed: {why}", "step": ck.step if ck else None,
                    "log": str(run.run_dir / "train.log"), "trained": True}
        _progress(i, n, run, f"trained to step {done.step} in {time.time() - t0:.0f} s; evaluating")
    else:
        _progress(i, n, run, f"already finished at step {done.step}; evaluating (cached if unchanged)")
    row = evaluated_row(run, done, spec, trained)
    _progress(i, n, run, f"{row['status']}" + (f": {_summary(row)}" if row["status"] == "ok" else ""))
    return row


# ---------------------------------------------------------------------------------------------- SLURM

def _last_job(run) -> Optional[dict]:
    """The run's newest ``unimlip-ablate --submit`` record in its submissions.jsonl, if any."""
    from launch.runs import SUBMISSIONS, submissions

    if not (run.run_dir / SUBMISSIONS).is_file():
        return None
    records = [r for r in submissions(run.run_dir) if r.get("kind") == "ablate"]
    return records[-1] if records else None


def _job_state(record: Optional[dict]) -> Optional[str]:
    """The SLURM state of a run's last ablation job while it may still run, else None."""
    from launch import slurm

    if not record or record.get("cluster") != "slurm":
        return None
    state = slurm.query_states([record["job_id"]])[record["job_id"]].state
    return None if state in slurm.TERMINAL_STATES or state == "UNKNOWN" else state


def submit_array(runs: list, spec, args, run_root: Path) -> tuple[dict, int]:
    """Submit the runs that are neither finished nor queued as one array; returns ``{run_dir: job id}``."""
    from launch import slurm
    from launch.runs import record_submission, write_config
    from launch.submit import _preflight, _ranks, _resources
    from unimlip_train.ablation.job import AblationJob

    todo = [r for r in runs if r.finished(args.force) is None and _job_state(_last_job(r)) is None]
    if not todo:
        return {}, 0
    tasks, gpus = _ranks(args)
    folder, res = run_root / "slurm" / "%j", _resources(args, "unimlip-ablate", tasks, gpus)
    if args.dry_run:
        print(f"# ---- array of {len(todo)} tasks (not submitted) ----")
        print(slurm.sbatch_script(folder, res, array_size=len(todo)), end="")
        for k, r in enumerate(todo):
            print(f"# task {k}: {r.label} -> {r.run_dir} (config hash {r.cfg.hash()})")
        return {}, len(todo)
    executor = _preflight(args, folder, res)
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
    from launch import slurm

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
        _progress(i, len(runs), run, row["status"] + (f": {_summary(row)}" if row["status"] == "ok" else ""))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main

def _eval_spec(args, cfg, data: str):
    from unimlip_train.ablation.evaluate import EvalSpec

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] or list(cfg.eval.classes)
    return EvalSpec(data=os.path.abspath(args.eval_data) if args.eval_data else data,
                    split=args.eval_split or cfg.eval.split, probe_data="" if args.no_probe else data,
                    probe_split=args.probe_split, classes=classes,
                    prompts=os.path.abspath(args.prompts) if args.prompts else cfg.eval.prompts,
                    label_key=args.label_key or cfg.eval.label_key, multi_label=args.multi_label or cfg.eval.multi_label,
                    batch_size=args.eval_batch_size, workers=args.workers)


def _about(args, runs, spec, baseline) -> list[str]:
    seeds = sorted({r.seed for r in runs})
    steps = sorted({r.cfg.train.steps for r in runs})
    return [f"Trained on `{runs[0].cfg.data.train}` for {', '.join(map(str, steps))} steps, seeds "
            f"{', '.join(map(str, seeds))}" + (f", {args.nproc} processes" if args.nproc > 1 else "") + ".",
            f"Evaluated on `{spec.data}` [{spec.split}]: retrieval"
            + (f"; zero-shot ({', '.join(spec.classes) or 'classes from the labels'}; prompts "
               f"`{spec.prompts or 'packaged chest_xray.yaml'}`)" + (
                   f" and linear probe fitted on `{spec.probe_data}` [{spec.probe_split}]" if spec.probe_data else "")
               + " when the samples carry labels") + ".",
            "Overrides: " + (" ".join(f"`{o}`" for o in args.overrides) if args.overrides else "none") + ".",
            f"Baseline: `{baseline}`." if baseline else "No CLIP-only config among the rows: no differences shown."]


def finish(rows: list[dict], args, runs, spec, run_root: Path, final: bool) -> str:
    """Means, differences, both files; returns the one-line JSON (printed by the caller when final)."""
    from unimlip_train.ablation import table

    rows = table.mean_rows(rows)
    baseline = table.find_baseline(rows, args.baseline)
    table.add_deltas(rows, baseline)
    md = table.markdown(rows, baseline, _about(args, runs, spec, baseline))
    doc = table.write(run_root, rows, md)
    if final:
        print("\n" + md, flush=True)
        print(f"wrote {run_root / 'ablation.json'} and {run_root / 'ablation.md'}", flush=True)
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from launch.runs import check_run_dir
    from launch.slurm import LaunchError
    from unimlip_train.ablation.plan import plan_runs
    from unimlip_train.config import ConfigError

    run_root = Path(args.run_root).resolve()
    data = os.path.abspath(args.data)
    try:
        if args.baseline and args.baseline not in {Path(c).stem for c in args.configs}:
            raise ConfigError(f"--baseline {args.baseline!r} is not among the configs")
        runs = plan_runs(args.configs, data, run_root, args.steps, args.seeds, args.overrides)
        for run in runs:
            check_run_dir(run.run_dir, run.cfg, args.force)
        spec = _eval_spec(args, runs[0].cfg, data)
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
            rows.append(run_locally(i, len(runs), run, spec, args))
            finish(rows, args, runs, spec, run_root, final=False)  # a partial table survives an interruption
    doc = finish(rows, args, runs, spec, run_root, final=True)
    print(doc, flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
