"""``unimlip-demo``: the main job end to end on the embedded default (configs/tiny_cpu.yaml).

Synthesize a chest-X-ray-like dataset and shard it, train the tiny Uni-Mlip with every term on in N gloo
processes (torchrun), then evaluate image<->text retrieval on the held-out split next to chance. The last
line printed is one JSON object (``i2t_R@1``, ``t2i_R@1``, ``chance_R@1``, ...), for scripts; the printed table
is also written to ``OUT/demo_table.json``, which ``bench/readme_demo.py`` compares with the README's table (or
writes into it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from unimlip_train.cli.args import parse_with_overrides

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
#: The table the demo prints, written into --out for bench/readme_demo.py.
TABLE_FILE = "demo_table.json"


def _run(cmd: list[str], what: str, check: bool = True) -> int:
    print(f"[demo] {what}: {' '.join(cmd)}", flush=True)
    # The venv's bin first, even when it is not activated: DeepSpeed JIT-builds an op with the ninja on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": path})
    if check and proc.returncode != 0:
        sys.exit(f"unimlip-demo: {what} failed (exit {proc.returncode})")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unimlip-demo",
        description="The main job end to end on the embedded default config: synthesize and shard a chest-X-ray-"
                    "like dataset, train the tiny Uni-Mlip (every term on) with N gloo processes, then print "
                    "held-out image<->text retrieval R@1/R@5 next to chance. The last line is one JSON object.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--samples", type=int, default=2000, help="synthetic image-report pairs (default 2000)")
    p.add_argument("--config", default=str(CONFIG), help=f"base config (default {CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides")
    args = parse_with_overrides(p, argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from unimlip_train.config.load import load_config
    from unimlip_train.config.origins import ConfigError
    from unimlip_train.data.augment import check_augment
    from unimlip_train.models.pretrained import resolve_towers

    out = Path(args.out).resolve()
    shards, run_dir = out / "shards", out / "run"
    overrides = [f"data.train={shards}/index.json", f"data.val={shards}/index.json", f"train.steps={args.steps}",
                 *args.overrides]
    try:
        cfg = load_config(args.config, overrides, resolve=(resolve_towers, check_augment))
    except ConfigError as e:
        p.exit(2, f"unimlip-demo: config error: {e}\n")
    t0 = time.time()
    if not (shards / "index.json").is_file():
        _run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", str(args.samples),
              "--image-size", str(cfg.data.image_size), "--max-size", str(cfg.data.image_size),
              "--val-fraction", "0.1", "--shard-size", "250", "--out", str(shards), "--no-progress"],
             "synthesize + shard")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from scratch
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
             "-m", "unimlip_train.cli.train", "--config", args.config, "--run-dir", str(run_dir), *overrides]
    code = _run(train, f"train ({args.nproc} processes)", check=False)
    restarts = 0
    while code != 0 and restarts < 2:  # a crashed job resumes exactly from its latest complete checkpoint
        restarts += 1
        print(f"[demo] training exited with {code}; resuming from the latest checkpoint (restart {restarts} of 2)")
        code = _run(train, "resume training", check=restarts == 2)

    from unimlip_train.eval.validate import validate
    from unimlip_train.export import load_for_eval, resolve_checkpoint

    checkpoint = resolve_checkpoint(str(run_dir))
    model, _, tokenizer = load_for_eval(checkpoint)
    metrics = validate(model, cfg, tokenizer, rank=0, world_size=1)
    print(f"\nheld-out retrieval ({int(metrics['num_samples'])} pairs, split '{cfg.eval.split}'):")
    print(f"  {'':6s} {'R@1':>7s} {'R@5':>7s}   chance R@1")
    for d in ("i2t", "t2i"):
        print(f"  {d:6s} {metrics[f'{d}_R@1']:7.2f} {metrics[f'{d}_R@5']:7.2f}   {metrics['chance_R@1']:.2f}")
    table = {"pairs": int(metrics["num_samples"]), "steps": args.steps, "nproc": args.nproc,
             **{k: round(metrics[k], 4) for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "chance_R@1")}}
    (out / TABLE_FILE).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"checkpoint:  {checkpoint}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}   ({time.time() - t0:.0f} s in total)")
    print(json.dumps({**{k: round(v, 4) for k, v in metrics.items()}, "checkpoint": checkpoint,
                      "tensorboard": str(run_dir / "tb"), "steps": args.steps, "nproc": args.nproc,
                      "restarts": restarts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
