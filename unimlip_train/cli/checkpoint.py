"""``unimlip-checkpoint``: look into a training checkpoint, or reshard it for another number of ranks offline.

``reshard CHECKPOINT --world-size N [--zero-stage S] --out DIR`` writes a tag for N ranks (consolidated fp32
weights and Adam state, per rank its random state and the data stream's position) that ``unimlip-train --resume
DIR`` takes; ``inspect CHECKPOINT`` prints what a tag holds, the last line one JSON object.
Exit statuses: 0 done (inspect: the tag is intact), 1 inspect found it damaged, 2 a bad argument or a checkpoint
that cannot be read.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unimlip-checkpoint",
        description="Inspect a training checkpoint, or reshard it offline (one CPU machine) for another number of "
                    "ranks or another ZeRO stage. A checkpoint is a run dir (its newest intact checkpoint), its "
                    "checkpoints dir, or one step_NNNNNNN dir.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="write CHECKPOINT as a checkpoint for N ranks",
                       description="Write CHECKPOINT (any ZeRO stage, precision and world size) as a checkpoint for "
                                   "--world-size ranks: fp32 weights, master weights and Adam moments as "
                                   "safetensors, each rank's random state, and the data stream's position, whose "
                                   "interrupted epoch is recut for the new ranks and workers when training resumes. "
                                   "unimlip-train --resume DIR takes it; it trains as resuming CHECKPOINT directly "
                                   "at the new shape does.")
    r.add_argument("checkpoint", help="a run dir, its checkpoints dir, or a step_NNNNNNN dir")
    r.add_argument("--world-size", type=int, required=True, metavar="N", help="ranks the new checkpoint is for")
    r.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, metavar="S",
                   help="ZeRO stage it is for (default: the checkpoint's; any stage loads it)")
    r.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint directory (created; must be empty)")
    i = sub.add_parser("inspect", help="what a checkpoint holds (last line: one JSON object)",
                       description="Print what a checkpoint holds: step, samples seen, data epoch, the ranks, ZeRO "
                                   "stage and precision that wrote it, its format and whether it is intact; the last "
                                   "line is one JSON object. Exit status 1 when it is damaged.")
    i.add_argument("checkpoint", help="a run dir, its checkpoints dir, or a step_NNNNNNN dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from unimlip_train.engine.checkpoint import CheckpointError, resolve_checkpoint  # torch: after --help
    from unimlip_train.engine.checkpoint.describe import describe, lines
    from unimlip_train.engine.checkpoint.integrity import is_complete
    from unimlip_train.engine.checkpoint.reshard import reshard

    try:
        if args.command == "reshard":
            out = reshard(args.checkpoint, args.world_size, args.out, args.zero_stage)
            record = describe(out)
            print(f"resharded {record['resharded_from']['path']} -> {out} for {args.world_size} ranks, ZeRO "
                  f"{record['zero_stage']}; resume with: unimlip-train --resume {out} ...")
            print(json.dumps(record))
            return 0
        path = args.checkpoint if is_complete(args.checkpoint) else resolve_checkpoint(args.checkpoint)
        record = describe(path)
        print("\n".join(lines(record)))
        print(json.dumps(record))
        return 0 if record["intact"] else 1
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"unimlip-checkpoint: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
