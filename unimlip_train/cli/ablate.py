"""``unimlip-ablate``: the Uni-Mlip ablation table in one command.

Trains every config (x every seed) on the same shards, one after another here (``unimlip-train``
subprocesses, under torchrun with ``--nproc``) or as one SLURM job array (``--submit``), evaluates every final
checkpoint the same way (retrieval; zero-shot and a linear probe when the eval shards carry labels) and writes
``RUN_ROOT/ablation.json`` and ``RUN_ROOT/ablation.md``: one row per config with, for every metric M, the mean
over seeds ``M``, ``M_std`` (sample std) and ``M_ci95`` (Student-t 95 % interval), the ``seeds``, and for rows
other than the baseline ``delta_M`` and ``delta_M_ci95`` (the difference paired by seed and its t-interval);
each config row lists its per-seed runs under ``runs``. The markdown marks a difference whose interval
excludes 0.

Rerunning the same command trains nothing that is finished and re-evaluates only checkpoints that changed;
an interrupted or failed run resumes from its newest checkpoint. The last stdout line is ablation.json's list
as one line of JSON. Exit status: 0 every row ok, 1 some row failed or is still pending, 2 bad arguments or
config (before anything trains).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from launch.options import add_slurm_arguments
from unimlip_train.cli.args import is_override

EPILOG = """examples:
  unimlip-ablate --configs configs/ablations/*.yaml --data shards/ --run-root runs/ablation --steps 300
  unimlip-ablate --configs configs/ablations/clip_only.yaml configs/ablations/all.yaml --data shards/ \\
      --run-root runs/abl --seeds 0,1 --classes normal,pneumonia model.tokenizer=tok/ data.num_workers=1
  unimlip-ablate --configs configs/ablations/*.yaml --data /data/shards --run-root runs/abl --submit \\
      --partition gpu --gpus-per-node 8 --time 12:00:00 --wait

Overrides (key.sub=value) may stand anywhere on the line and apply to every config, after the config file
and after what --data/--steps/--seeds set. Runs go to RUN_ROOT/<config name>/seed<k> (training log:
train.log there). --data is trained on (its 'train' split); --eval-data (default: --data) is evaluated on
its --eval-split; the linear probe is fitted on --data's --probe-split, whose images (not labels) also
calibrate single-label zero-shot (zeroshot/calibrated_*: each class's logit minus its mean over them). Metrics
are percentages."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unimlip-ablate", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="unimlip-ablate --configs YAML [YAML ...] --data SHARDS --run-root DIR [options] [key.sub=value ...]")
    p.add_argument("--configs", nargs="+", required=True, metavar="YAML",
                   help="ablation configs, e.g. configs/ablations/*.yaml (the file stem names the row)")
    p.add_argument("--data", required=True, help="training shards: dir, index.json or pattern")
    p.add_argument("--run-root", required=True, metavar="DIR", help="where the runs and the tables go")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every config (default: each config's)")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="comma-separated seeds, e.g. 0,1,2,3,4: each config trained and evaluated once per seed "
                        "(RUN_ROOT/<config>/seed<k>), statistics over them (default: the config's seed)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run (torchrun) (default 1)")
    p.add_argument("--force", action="store_true",
                   help="reuse run dirs written by a different config (continue them with the new one)")
    p.add_argument("--baseline", default="", metavar="NAME",
                   help="config name (file stem) the paired differences are taken to (default: clip_only when "
                        "present, else the first config whose only term is itc)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default="", help="evaluation shards (default: --data)")
    e.add_argument("--eval-split", default="", help="split of --eval-data to evaluate (default: the config's eval.split)")
    e.add_argument("--probe-split", default="train", help="split of --data the linear probe is fitted on (default train)")
    e.add_argument("--no-probe", action="store_true", help="skip the linear probe (and the zero-shot calibration)")
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
    add_slurm_arguments(p, ranks=True)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options plus ``overrides``: every ``key.sub=value`` token, wherever it stands (also among --configs)."""
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from launch.ablation import ablate  # torch, the towers and the jobs load after parsing: --help stays quick

    return ablate(args)


if __name__ == "__main__":
    sys.exit(main())
