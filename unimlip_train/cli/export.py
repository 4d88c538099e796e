"""``unimlip-export CHECKPOINT --out DIR``: consolidated fp32 weights (safetensors) + config + tokenizer.

The result loads with ``unimlip_train.engine.checkpoint.load_for_eval(DIR)`` without DeepSpeed, for
evaluation and fine-tuning.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unimlip-export",
                                description="Export a training checkpoint (any ZeRO stage, any world size) as "
                                            "model.safetensors (fp32) + config.yaml + tokenizer/.")
    p.add_argument("checkpoint", help="a run dir (its latest checkpoint), its checkpoints dir, or a step_NNNNNNN dir")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    args = p.parse_args(argv)
    from unimlip_train.engine.checkpoint import export

    try:
        out = export(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"unimlip-export: error: {e}\n")
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
