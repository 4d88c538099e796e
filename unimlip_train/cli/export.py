"""``unimlip-export CHECKPOINT --out DIR [--format safetensors|open_clip]``.

``safetensors`` (default): consolidated fp32 weights + config + tokenizer, loadable with
``unimlip_train.export.load_for_eval(DIR)`` without DeepSpeed, for evaluation and fine-tuning; ``--optimizer`` adds
the Adam state (``optimizer.safetensors``: ``NAME.exp_avg`` / ``NAME.exp_avg_sq``; ``optimizer.json``: the groups).
``open_clip``: a folder ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads (image and text towers,
projections, temperature, tokenizer); configurations open_clip cannot express are refused with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unimlip-export",
        description="Export a training checkpoint (any ZeRO stage, any world size). "
                    "safetensors: model.safetensors (fp32) + config.yaml + tokenizer/. open_clip: "
                    "open_clip_config.json + open_clip_model.safetensors + the text tower's config.json + "
                    "tokenizer files, for open_clip.create_model_and_transforms('local-dir:DIR') (timm image "
                    "tower, Hugging Face text tower, linear projections; the training-only heads stay behind).")
    p.add_argument("checkpoint", help="a run dir (its latest checkpoint), its checkpoints dir, a step_NNNNNNN dir, "
                                      "or (with --format open_clip) a safetensors export")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--format", choices=("safetensors", "open_clip"), default="safetensors",
                   help="safetensors (default): for unimlip-eval and fine-tuning; open_clip: for open_clip users")
    p.add_argument("--optimizer", action="store_true",
                   help="(safetensors) also write optimizer.safetensors (NAME.exp_avg and NAME.exp_avg_sq of every "
                        "trainable parameter, fp32, NAME as in model.safetensors) and optimizer.json (each parameter "
                        "group's step, betas, lr and parameter names)")
    args = p.parse_args(argv)
    if args.optimizer and args.format != "safetensors":
        p.error("--optimizer goes with --format safetensors")
    try:
        if args.format == "open_clip":
            from unimlip_train.export import export_open_clip

            config = export_open_clip(args.checkpoint, args.out)
            left = config["unimlip"]["left_behind"]
            note = f" (training-only parts left behind: {', '.join(left)})" if left else ""
            print(f"exported {args.checkpoint} -> {args.out} for open_clip.create_model_and_transforms"
                  f"('local-dir:{args.out}'){note}")
            if config["model_cfg"]["text_cfg"]["hf_model_name"] == os.path.abspath(args.out):
                print("note: open_clip reads the text tower's config.json from this folder by its absolute path "
                      "(text_cfg.hf_model_name): export again after moving the folder")
        else:
            from unimlip_train.export import export

            print(f"exported {args.checkpoint} -> {export(args.checkpoint, args.out, optimizer=args.optimizer)}"
                  + (" (with the optimizer state)" if args.optimizer else ""))
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"unimlip-export: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
