"""The submissions of ``unimlip-submit`` (its command line: ``unimlip_train.cli.submit``): training, sharding and
evaluation as SLURM jobs through Submitit (or as local processes with ``--cluster local``).

Every submission prints ``job_id: ID`` on its own line, the log paths and the run directory, and appends a
record to ``RUN_DIR/submissions.jsonl``, which ``unimlip-submit status --run-dir RUN_DIR`` reads back
(``launch.status``).
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from launch import slurm
from launch.jobs import EvalJob, TrainJob, WithCallerEnvironment, caller_environment
from launch.options import after_dashes, preflight, ranks, resources
from launch.runs import check_run_dir, record_submission, write_config
from launch.sharding import encode_slice, merge_slices, parse_shard_argv
from launch.slurm import LaunchError
from unimlip_train.config.load import dump_yaml, load_config
from unimlip_train.config.validate import derive_grad_accum, global_batch_error
from unimlip_train.data.augment import check_augment
from unimlip_train.models.pretrained import resolve_towers


def _report(job, run_dir: Path, kind: str, argv: Sequence[str], extra: dict) -> None:
    """Print what the user needs to find the job again, and record it in the run dir."""
    stdout, stderr = slurm.log_paths(job)
    env = caller_environment()
    record = {"kind": kind, "job_id": str(job.job_id), "stdout": stdout, "stderr": stderr,
              "folder": str(job.paths.folder), "argv": list(argv), **extra, "env": env}
    record_submission(run_dir, record)
    print(f"job_id: {record['job_id']}")
    if env:
        print(f"environment passed into the job: {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())}")
    print(f"stdout: {stdout}")
    print(f"stderr: {stderr}")
    print(f"run_dir: {run_dir}")
    print(f"follow: unimlip-submit status --run-dir {shlex.quote(str(run_dir))}")


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


def submit_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``unimlip-submit train``: one (multi-node) training job that requeues itself on preemption."""
    cfg = load_config(args.config, args.overrides, resolve=(resolve_towers, check_augment))
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    cfg.run_dir = str(run_dir)
    tasks, gpus = ranks(args)
    if args.max_requeues < 0:
        raise LaunchError("--max-requeues must be >= 0")
    folder, res = run_dir / "slurm" / "%j", resources(args, "unimlip-train", tasks, gpus, elastic=True)
    if res.max_nodes > res.nodes:
        check_elastic_batch(cfg, res.nodes, res.max_nodes, tasks)
    if cfg.train.global_batch_size:  # the job's world is nodes x tasks, not this shell's (each launch derives again)
        cfg.train.grad_accum = derive_grad_accum(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                                 res.nodes * tasks)
    if args.dry_run:
        print("# ---- sbatch script (not submitted) ----")
        print(slurm.sbatch_script(folder, res), end="")
        print(f"# ---- resolved config (hash {cfg.hash()}), run dir {run_dir} ----")
        print(dump_yaml(cfg), end="")
        return 0
    executor = preflight(args, folder, res)
    check_run_dir(run_dir, cfg, args.force)
    write_config(run_dir, cfg)
    job = executor.submit(TrainJob(cfg.to_dict(), str(run_dir), max_requeues=args.max_requeues))
    _report(job, run_dir, "train", argv, {"cluster": args.cluster, "config_hash": cfg.hash(), "nodes": args.nodes,
                                          "tasks_per_node": tasks, "gpus_per_node": gpus, "time_limit": args.time,
                                          "partition": args.partition})
    return _wait_local([job]) if args.cluster == "local" else 0


def check_elastic_batch(cfg, low: int, high: int, tasks_per_node: int) -> None:
    """An elastic job (``--nodes low-high``) restarts on any node count in the range: it needs a fixed
    ``train.global_batch_size`` (the grad accumulation follows the world size), divisible at every count."""
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if not global_batch:
        fits = micro * tasks_per_node * math.lcm(*range(low, high + 1))
        raise LaunchError(
            f"--nodes {low}-{high} is an elastic job: set train.global_batch_size, so that a restart on fewer nodes "
            f"trains with the same batch (e.g. train.global_batch_size={fits}: micro batch {micro} x "
            f"{tasks_per_node} rank(s) per node x any node count from {low} to {high} divides it)")
    for nodes in range(low, high + 1):
        if problem := global_batch_error(global_batch, micro, nodes * tasks_per_node):
            raise LaunchError(f"train.global_batch_size: {problem}; the elastic job --nodes {low}-{high} could "
                              f"restart on {nodes} node(s) x {tasks_per_node} rank(s)")


def submit_eval(args: argparse.Namespace, argv: Sequence[str], eval_argv: list[str],
                parsed: argparse.Namespace) -> int:
    """``unimlip-submit eval``: ``unimlip-eval`` as a job; ``parsed`` are ``eval_argv`` as unimlip-eval parses
    them (the caller parses them before anything is submitted, so usage errors show now, not in the queue)."""
    run_dir = Path(args.run_dir).resolve()
    out = parsed.out or str(run_dir / "eval" / f"{parsed.command}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    tasks, gpus = ranks(args)
    folder, res = run_dir / "slurm" / "%j", resources(args, "unimlip-eval", tasks, gpus)
    if args.dry_run:
        print(slurm.sbatch_script(folder, res), end="")
        print(f"# unimlip-eval {shlex.join(eval_argv)} --out {out}")
        return 0
    executor = preflight(args, folder, res)
    job = executor.submit(EvalJob(parsed, out))
    _report(job, run_dir, "eval", argv, {"cluster": args.cluster, "metrics": out})
    return _wait_local([job]) if args.cluster == "local" else 0


def submit_shard(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``unimlip-submit shard``: an array of ``--array-size`` encode tasks, then one merge job (``afterany``)
    that writes the shards."""
    shard_argv = after_dashes(args.shard_args)
    ns = parse_shard_argv(shard_argv)
    k = args.array_size
    if k < 1:
        raise LaunchError(f"--array-size {k}: must be >= 1")
    out = Path(ns.out).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else out / ".submit"
    folder, res = run_dir / "slurm" / "%j", resources(args, "unimlip-shard")
    merge_res = replace(res, job_name=res.job_name + "-merge", dependency="afterany:<array id>")
    if args.dry_run:
        print(f"# ---- array: {k} encode tasks (not submitted) ----")
        print(slurm.sbatch_script(folder, res, array_size=k), end="")
        print("# ---- merge job (not submitted) ----")
        print(slurm.sbatch_script(folder, merge_res), end="")
        print(f"# unimlip-shard {shlex.join(shard_argv)}")
        return 0
    array_ex = preflight(args, folder, res)
    jobs = array_ex.map_array(WithCallerEnvironment(encode_slice), [shard_argv] * k, range(k), [k] * k)
    array_id = str(jobs[0].job_id).split("_")[0]
    if args.cluster == "local":  # no scheduler to hold the merge back: wait here
        if _wait_local(jobs):
            return 1
        merge_res = replace(merge_res, dependency=None)
    else:
        merge_res = replace(merge_res, dependency=f"afterany:{array_id}")
    merge = slurm.make_executor(folder, merge_res, args.cluster).submit(WithCallerEnvironment(merge_slices), shard_argv, k)
    _report(jobs[0], run_dir, "shard", argv, {"cluster": args.cluster, "job_id": array_id, "array_size": k,
                                              "merge_job_id": str(merge.job_id), "out": str(out)})
    print(f"merge_job_id: {merge.job_id}")
    return _wait_local([merge]) if args.cluster == "local" else 0
