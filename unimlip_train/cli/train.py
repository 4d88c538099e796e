"""``unimlip-train``: train from a YAML config, on one process or under torchrun / deepspeed / srun.

Exit codes: 0 finished or preempted (a checkpoint was written; rerun the same command to resume),
1 training error (e.g. too many non-finite losses), 2 configuration error (before any process group).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from unimlip_train.config import ConfigError, dump_yaml, load_config
from unimlip_train.engine.preemption import PreemptionFlag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unimlip-train",
        description="Train Uni-Mlip (CLIP + unified self-supervision) with DeepSpeed. Start it alone for one "
                    "process, or under `torchrun --nproc_per_node N`, `deepspeed`, or `srun` for several.",
        epilog="example: torchrun --standalone --nproc_per_node 2 -m unimlip_train.cli.train "
               "--config configs/tiny_cpu.yaml train.steps=100 loss.mlm.weight=0")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (may 'extends:' another)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: run_dir from the config)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: newest complete checkpoint in the run dir if any (default); none: start fresh; "
                        "PATH: a run dir, its checkpoints dir, or one step_NNNNNNN checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The `deepspeed` launcher appends --local_rank=N; the rank itself is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=500")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"unimlip-train: config error: {e}\n")
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    stop = PreemptionFlag()  # sbatch --signal USR2@N, preemption: checkpoint on all ranks, then exit
    stop.install(signal.SIGUSR2, signal.SIGTERM)
    import torch.distributed as dist

    from unimlip_train.engine.trainer import NonFiniteLossError, train

    try:
        result = train(cfg, cfg.run_dir, resume=args.resume, stop_requested=stop)
    except NonFiniteLossError as e:
        print(f"unimlip-train: {e}", file=sys.stderr, flush=True)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"unimlip-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"unimlip-train: {result.status} at step {result.step}; run dir {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
