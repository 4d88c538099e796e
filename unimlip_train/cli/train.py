"""``unimlip-train``: train from a YAML config, on one process or under torchrun / deepspeed / srun.

Exit codes (docs/training.md#exit-statuses, one table): 0 finished, or stopped by the scheduler (SIGUSR2 /
SIGTERM) after a checkpoint: rerun the same command to resume; 1 training error (too many non-finite losses, too
many corrupt samples, a checkpoint that cannot be written or read, ...); 2 configuration error (before any process
group); 3 the run dir is in use by another job; 4 hung (the hang watchdog ended the job, stacks in RUN_DIR/hang/);
5 diverged (a loss spike after train.max_rollbacks rollbacks, or with no checkpoint to roll back to); 129 the
launcher (torchrun, deepspeed, the SLURM step) died, so the rank left without a checkpoint; 130 interrupted by
Ctrl-C after a checkpoint (a second Ctrl-C aborts at once, without one).
"""
from __future__ import annotations

import argparse
import signal
import sys

from unimlip_train.cli.args import parse_with_overrides
from unimlip_train.config.load import dump_yaml, load_config
from unimlip_train.config.origins import ConfigError

EXIT_IN_USE = 3
EXIT_INTERRUPTED = 130
# 4 (hung) and 129 (launcher gone) are os._exit statuses of engine.health.watchdog.HUNG and .parent.LAUNCHER_GONE;
# 5 is engine.health.rollback.DIVERGED.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unimlip-train",
        description="Train Uni-Mlip (CLIP + unified self-supervision) with DeepSpeed. Start it alone for one "
                    "process, or under `torchrun --nproc_per_node N`, `deepspeed`, or `srun` for several. "
                    "Overrides (key.sub=value) may stand anywhere on the line. One job per run dir: a second "
                    "one exits with status 3. Ctrl-C checkpoints and exits (130); a second Ctrl-C aborts. A hung job "
                    "exits with 4, a diverged one with 5 (every status: docs/training.md).",
        epilog="example: torchrun --standalone --nproc_per_node 2 -m unimlip_train.cli.train "
               "--config configs/tiny_cpu.yaml train.steps=100 loss.mlm.weight=0")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (may 'extends:' another)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: run_dir from the config)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: newest intact checkpoint in the run dir if any (default); none: start fresh; "
                        "PATH: a run dir, its checkpoints dir, or one step_NNNNNNN checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The `deepspeed` launcher appends --local_rank=N; the rank itself is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=500")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    # here, not on top: --help needs no timm, transformers or albumentations
    from unimlip_train.data.augment import check_augment
    from unimlip_train.models.pretrained import resolve_towers

    try:
        cfg = load_config(args.config, args.overrides, resolve=(resolve_towers, check_augment))
    except ConfigError as e:
        parser.exit(2, f"unimlip-train: config error: {e}\n")
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # torch, the towers and the engine load only now: --help and --print-config stay quick
    import torch.distributed as dist

    import unimlip_train.distributed.process_group as du
    from unimlip_train.engine.checkpoint import CheckpointWriteError
    from unimlip_train.engine.health.limits import CorruptDataError, NonFiniteLossError
    from unimlip_train.engine.health.rollback import DIVERGED, DivergedError
    from unimlip_train.engine.monitor import MissingPackageError
    from unimlip_train.engine.preemption import PreemptionFlag
    from unimlip_train.engine.run import StartRefused, run_training
    from unimlip_train.engine.run_lock import RunDirInUse
    from unimlip_train.eval.validate import validate_with_examples

    main_rank = du.env_rank() == 0
    stop = PreemptionFlag()  # sbatch --signal USR2@N, preemption, Ctrl-C: checkpoint on all ranks, then exit
    try:
        result = run_training(cfg, cfg.run_dir, resume=args.resume, stop_requested=stop,
                              validate=validate_with_examples, listen=(signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
    except RunDirInUse as e:  # check_free (every rank, before the rendezvous) or the lock itself
        if main_rank:
            print(f"unimlip-train: {e}", file=sys.stderr, flush=True)
        return EXIT_IN_USE
    except StartRefused as e:  # a damaged or missing --resume checkpoint: one line, before any start
        if main_rank:
            print(f"unimlip-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as e:  # raised on every rank alike, after the "diverged" summary line
        if main_rank:
            print(f"unimlip-train: {e}", file=sys.stderr, flush=True)
        return DIVERGED
    except (NonFiniteLossError, CorruptDataError, MissingPackageError) as e:  # raised on every rank alike
        if main_rank:
            print(f"unimlip-train: {e}", file=sys.stderr, flush=True)
        return 1
    except (FileNotFoundError, ValueError, CheckpointWriteError) as e:  # the message names the file
        print(f"unimlip-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    interrupted = result.status == "preempted" and stop.interrupted
    if main_rank and interrupted:
        print(f"unimlip-train: interrupted at step {result.step}, rerun to resume (run dir {cfg.run_dir})",
              flush=True)
    elif main_rank:
        print(f"unimlip-train: {result.status} at step {result.step}; run dir {cfg.run_dir}", flush=True)
    return EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
