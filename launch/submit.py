"""``unimlip-submit``: submit training, sharding and evaluation to SLURM with Submitit, and follow the jobs.

Every submission prints ``job_id: ID`` on its own line, the log paths and the run directory, and appends a
record to ``RUN_DIR/submissions.jsonl``, which ``unimlip-submit status --run-dir RUN_DIR`` reads back.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from launch import slurm
from launch.runs import check_run_dir, record_submission, submissions, write_config
from launch.slurm import LaunchError, Resources
from unimlip_train.cli.args import parse_with_overrides

EPILOG = """examples:
  unimlip-submit train --config configs/vitb16_biomedbert.yaml --run-dir runs/vitb16 \\
      --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 train.lr=3e-4
  unimlip-submit train --config configs/tiny_cpu.yaml --run-dir runs/tiny --nodes 1 --tasks-per-node 2 \\
      --partition debug --time 00:30:00            # CPU ranks over gloo
  unimlip-submit status --run-dir runs/vitb16
  unimlip-submit shard --array-size 8 --partition cpu --time 02:00:00 -- \\
      manifest --manifest data.csv --out shards/     # unimlip-shard's arguments after --
  unimlip-submit eval --run-dir runs/vitb16 --partition gpu --time 01:00:00 -- \\
      retrieval --checkpoint runs/vitb16 --data shards/index.json
"""


def _add_slurm_arguments(p: argparse.ArgumentParser, ranks: bool) -> None:
    g = p.add_argument_group("SLURM resources")
    g.add_argument("--partition", default="", help="partition (checked with sinfo; default: the cluster's default)")
    g.add_argument("--time", default="01:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 01:00:00)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    if ranks:
        per_node = g.add_mutually_exclusive_group()
        per_node.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank (task) per GPU")
        per_node.add_argument("--tasks-per-node", type=int, default=0,
                              help="ranks per node without GPUs (CPU ranks over gloo)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank (data loader workers + 1)")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 256G")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node features, e.g. a100")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--comment", default=None)
    g.add_argument("--dependency", default=None, help="e.g. afterok:12345")
    g.add_argument("--job-name", default=None, help="job name (default: unimlip-<command>)")
    g.add_argument("--signal-seconds", type=int, default=120,
                   help="send USR2 this many seconds before the time limit, to checkpoint and requeue (default 120)")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm (default), or local: the same job as local processes, waited for (debugging)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimlip-submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="submit a (multi-node) training job that requeues itself on preemption",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    t.add_argument("--config", required=True, help="YAML config (may 'extends:' another)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    t.add_argument("--run-dir", default="", help="run directory (default: the config's run_dir)")
    t.add_argument("--max-requeues", type=int, default=20,
                   help="give up (job fails) when preempted after this many requeues (default 20)")
    t.add_argument("--force", action="store_true", help="reuse a run dir that belongs to another config")
    _add_slurm_arguments(t, ranks=True)

    s = sub.add_parser("shard", help="run unimlip-shard as a job array, one task per slice of the input",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    s.add_argument("--array-size", type=int, required=True, help="array tasks (slices of the input rows)")
    s.add_argument("--run-dir", default="",
                   help="where job logs and submissions.jsonl go (default: OUT/.submit, next to the shards)")
    s.add_argument("shard_args", nargs=argparse.REMAINDER, help="unimlip-shard's arguments (after --)")
    _add_slurm_arguments(s, ranks=False)

    st = sub.add_parser("status", help="the jobs of a run dir, their SLURM state, and training progress")
    st.add_argument("--run-dir", required=True)
    st.add_argument("--wait", action="store_true",
                    help="wait until every job has ended; exit 1 if any did not complete")
    st.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds")

    e = sub.add_parser("eval", help="run unimlip-eval as a job", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG)
    e.add_argument("--run-dir", required=True, help="where logs, submissions.jsonl and eval/*.json go")
    e.add_argument("eval_args", nargs=argparse.REMAINDER, help="unimlip-eval's arguments (after --)")
    _add_slurm_arguments(e, ranks=True)
    return parser


def _resources(args: argparse.Namespace, default_name: str, tasks_per_node: int = 1, gpus_per_node: int = 0) -> Resources:
    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: must be >= 1")
    return Resources(partition=args.partition, time=args.time, nodes=args.nodes, tasks_per_node=tasks_per_node,
                     gpus_per_node=gpus_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                     account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
                     comment=args.comment, dependency=args.dependency, signal_seconds=args.signal_seconds,
                     job_name=args.job_name or default_name)


def _ranks(args: argparse.Namespace) -> tuple[int, int]:
    """(tasks per node, GPUs per node): one task per GPU, or ``--tasks-per-node`` CPU ranks."""
    if args.gpus_per_node < 0 or args.tasks_per_node < 0:
        raise LaunchError("--gpus-per-node and --tasks-per-node must be >= 0")
    if args.gpus_per_node:
        return args.gpus_per_node, args.gpus_per_node
    return max(1, args.tasks_per_node), 0


def _preflight(args: argparse.Namespace, folder: Path, res: Resources):
    """Checks that need the cluster (sbatch on PATH, the partition), then the executor to submit with."""
    executor = slurm.make_executor(folder, res, args.cluster)
    if args.cluster == "slurm" and args.partition:
        slurm.check_partition(args.partition)
    return executor


def _report(job, run_dir: Path, kind: str, argv: Sequence[str], extra: dict) -> None:
    """Print what the user needs to find the job again, and record it in the run dir."""
    stdout, stderr = slurm.log_paths(job)
    record = {"kind": kind, "job_id": str(job.job_id), "stdout": stdout, "stderr": stderr,
              "folder": str(job.paths.folder), "argv": list(argv), **extra}
    record_submission(run_dir, record)
    print(f"job_id: {record['job_id']}")
    print(f"stdout: {stdout}")
    print(f"stderr: {stderr}")
    print(f"run_dir: {run_dir}")
    print(f"follow: unimlip-submit status --run-dir {shlex.quote(str(run_dir))}")


def _after_dashes(rest: list[str]) -> list[str]:
    """The wrapped tool's arguments: everything after our own options (a leading ``--`` dropped)."""
    return rest[1:] if rest[:1] == ["--"] else rest


def _wait_local(jobs: list) -> int:
    """--cluster local is for debugging: stay in the foreground and show how it ended."""
    status = 0
    for job in jobs:
        try:
            print(f"result ({job.job_id}): {job.results()}")
        except Exception as e:  # submitit re-raises the job's error with its traceback text
            print(f"job {job.job_id} failed: {e}", file=sys.stderr)
            status = 1
    return status


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launch.jobs import TrainJob
    from unimlip_train.config import dump_yaml, load_config
    from unimlip_train.models.pretrained import resolve_towers

    cfg = load_config(args.config, args.overrides, resolve=resolve_towers)
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    cfg.run_dir = str(run_dir)
    tasks, gpus = _ranks(args)
    if args.max_requeues < 0:
        raise LaunchError("--max-requeues must be >= 0")
    folder, res = run_dir / "slurm" / "%j", _resources(args, "unimlip-train", tasks, gpus)
    if args.dry_run:
        print("# ---- sbatch script (not submitted) ----")
        print(slurm.sbatch_script(folder, res), end="")
        print(f"# ---- resolved config (hash {cfg.hash()}), run dir {run_dir} ----")
        print(dump_yaml(cfg), end="")
        return 0
    executor = _preflight(args, folder, res)
    check_run_dir(run_dir, cfg, args.force)
    write_config(run_dir, cfg)
    job = executor.submit(TrainJob(cfg.to_dict(), str(run_dir), max_requeues=args.max_requeues))
    _report(job, run_dir, "train", argv, {"cluster": args.cluster, "config_hash": cfg.hash(), "nodes": args.nodes,
                                          "tasks_per_node": tasks, "gpus_per_node": gpus, "time_limit": args.time,
                                          "partition": args.partition})
    return _wait_local([job]) if args.cluster == "local" else 0


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launch.jobs import EvalJob
    from unimlip_train.eval.cli import build_parser as eval_parser

    eval_argv = _after_dashes(args.eval_args)
    parsed = eval_parser().parse_args(eval_argv)  # usage errors now, not in the queue
    run_dir = Path(args.run_dir).resolve()
    out = parsed.out or str(run_dir / "eval" / f"{parsed.command}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    tasks, gpus = _ranks(args)
    folder, res = run_dir / "slurm" / "%j", _resources(args, "unimlip-eval", tasks, gpus)
    if args.dry_run:
        print(slurm.sbatch_script(folder, res), end="")
        print(f"# unimlip-eval {shlex.join(eval_argv)} --out {out}")
        return 0
    executor = _preflight(args, folder, res)
    job = executor.submit(EvalJob(eval_argv, out))
    _report(job, run_dir, "eval", argv, {"cluster": args.cluster, "metrics": out})
    return _wait_local([job]) if args.cluster == "local" else 0


def cmd_shard(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Array of ``--array-size`` encode tasks, then one merge job (``afterany``) that writes the shards."""
    from dataclasses import replace

    from launch.sharding import encode_slice, merge_slices, parse_shard_argv

    shard_argv = _after_dashes(args.shard_args)
    ns = parse_shard_argv(shard_argv)
    k = args.array_size
    if k < 1:
        raise LaunchError(f"--array-size {k}: must be >= 1")
    out = Path(ns.out).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else out / ".submit"
    folder, res = run_dir / "slurm" / "%j", _resources(args, "unimlip-shard")
    merge_res = replace(res, job_name=res.job_name + "-merge", dependency="afterany:<array id>")
    if args.dry_run:
        print(f"# ---- array: {k} encode tasks (not submitted) ----")
        print(slurm.sbatch_script(folder, res, array_size=k), end="")
        print("# ---- merge job (not submitted) ----")
        print(slurm.sbatch_script(folder, merge_res), end="")
        print(f"# unimlip-shard {shlex.join(shard_argv)}")
        return 0
    array_ex = _preflight(args, folder, res)
    jobs = array_ex.map_array(encode_slice, [shard_argv] * k, range(k), [k] * k)
    array_id = str(jobs[0].job_id).split("_")[0]
    if args.cluster == "local":  # no scheduler to hold the merge back: wait here
        if _wait_local(jobs):
            return 1
        merge_res = replace(merge_res, dependency=None)
    else:
        merge_res = replace(merge_res, dependency=f"afterany:{array_id}")
    merge = slurm.make_executor(folder, merge_res, args.cluster).submit(merge_slices, shard_argv, k)
    _report(jobs[0], run_dir, "shard", argv, {"cluster": args.cluster, "job_id": array_id, "array_size": k,
                                              "merge_job_id": str(merge.job_id), "out": str(out)})
    print(f"merge_job_id: {merge.job_id}")
    return _wait_local([merge]) if args.cluster == "local" else 0


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


def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:  # noqa: ARG001
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
    for j, s in states.items():
        kind, submitted = kinds.get(j.split("_")[0], ("?", ""))
        restarts = f" requeued {s.requeues}x" if s.requeues else ""
        print(f"  {j:<14} {kind:<6} {s.state:<12} elapsed {s.elapsed or '-':<10} "
              f"exit {s.exit_code or '-':<6}{restarts}  submitted {submitted}")
    for r in records:
        if r.get("cluster") == "local":
            print(f"  {r['job_id']:<14} {r.get('kind', '?'):<6} (local run)  {r.get('time', '')}")
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


COMMANDS = {"train": cmd_train, "shard": cmd_shard, "status": cmd_status, "eval": cmd_eval}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_with_overrides(build_parser(), argv)
    from unimlip_train.config import ConfigError

    try:
        return COMMANDS[args.command](args, argv)
    except (LaunchError, ConfigError) as e:
        print(f"unimlip-submit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
