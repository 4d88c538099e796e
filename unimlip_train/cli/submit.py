"""``unimlip-submit``: submit training, sharding and evaluation to SLURM with Submitit, and follow the jobs.

Every submission prints ``job_id: ID`` on its own line, the log paths and the run directory, and appends a
record to ``RUN_DIR/submissions.jsonl``, which ``unimlip-submit status --run-dir RUN_DIR`` reads back.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import unimlip_train.cli.eval as eval_cli
from launch.options import add_slurm_arguments, after_dashes
from launch.slurm import LaunchError
from launch.status import show_status
from unimlip_train.cli.args import parse_with_overrides
from unimlip_train.config.origins import ConfigError

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
    add_slurm_arguments(t, ranks=True)

    s = sub.add_parser("shard", help="run unimlip-shard as a job array, one task per slice of the input",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    s.add_argument("--array-size", type=int, required=True, help="array tasks (slices of the input rows)")
    s.add_argument("--run-dir", default="",
                   help="where job logs and submissions.jsonl go (default: OUT/.submit, next to the shards)")
    s.add_argument("shard_args", nargs=argparse.REMAINDER, help="unimlip-shard's arguments (after --)")
    add_slurm_arguments(s, ranks=False)

    st = sub.add_parser("status", help="the jobs of a run dir, their SLURM state, and training progress")
    st.add_argument("--run-dir", required=True)
    st.add_argument("--wait", action="store_true",
                    help="wait until every job has ended; exit 1 if any did not complete")
    st.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds")

    e = sub.add_parser("eval", help="run unimlip-eval as a job", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG)
    e.add_argument("--run-dir", required=True, help="where logs, submissions.jsonl and eval/*.json go")
    e.add_argument("eval_args", nargs=argparse.REMAINDER, help="unimlip-eval's arguments (after --)")
    add_slurm_arguments(e, ranks=True)
    return parser


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launch.submit import submit_train  # the jobs import torch: not needed for --help or status

    return submit_train(args, argv)


def _shard(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launch.submit import submit_shard  # the jobs import torch: not needed for --help or status

    return submit_shard(args, argv)


def _eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    eval_argv = after_dashes(args.eval_args)
    parsed = eval_cli.build_parser().parse_args(eval_argv)  # usage errors now, not in the queue
    from launch.submit import submit_eval  # the jobs import torch: not needed for --help or status

    return submit_eval(args, argv, eval_argv, parsed)


def _status(args: argparse.Namespace, argv: Sequence[str]) -> int:  # noqa: ARG001
    return show_status(args)


COMMANDS = {"train": _train, "shard": _shard, "status": _status, "eval": _eval}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_with_overrides(build_parser(), argv)
    try:
        return COMMANDS[args.command](args, argv)
    except (LaunchError, ConfigError) as e:
        print(f"unimlip-submit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
