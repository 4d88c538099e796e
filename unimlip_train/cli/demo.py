"""``unimlip-demo``: the main job end to end on the embedded default (configs/tiny_cpu.yaml).

Synthesize a chest-X-ray-like dataset and shard it (a third of it, about 1,000 pairs, held out), train the tiny
Uni-Mlip (every term but ITM, which stays at its label prior at this size: issue 21) in N gloo processes
(torchrun), train CLIP alone (``configs/ablations/clip_only.yaml``) the same way for the same steps, then
evaluate image<->text retrieval of both on the held-out split: R@1/5/10 both ways and their mean (mean recall),
next to chance. On 1,000 pairs one R@1 point is about the standard error, so the mean recall is the number to
compare. The last line printed is one JSON object (the default's ``i2t_R@1``, ``mean_recall``, ...,
``chance_R@1``, and the baseline's under ``clip_only``), for scripts; the printed table is also written to
``OUT/demo_table.json``, which ``bench/readme_demo.py`` compares with the README's table (or writes into it).
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
BASELINE = CONFIG.parent / "ablations" / "clip_only.yaml"
#: The demo table's columns (bench/readme_demo.py renders them).
METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")
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
                    "like dataset, train the tiny Uni-Mlip (every term but ITM) and CLIP alone with N gloo processes, "
                    "then print both models' held-out image<->text retrieval (R@1/5/10 both ways, mean recall) "
                    "next to chance. The last line is one JSON object.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--samples", type=int, default=3000, help="synthetic image-report pairs (default 3000)")
    p.add_argument("--val-fraction", type=float, default=0.33,
                   help="held-out fraction of the pairs (default 0.33: about 1,000 of 3,000)")
    p.add_argument("--config", default=str(CONFIG), help=f"base config (default {CONFIG})")
    p.add_argument("--baseline", default=str(BASELINE),
                   help=f"the config trained beside it for comparison (default {BASELINE})")
    p.add_argument("--no-baseline", action="store_true", help="train and evaluate --config alone")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides")
    args = parse_with_overrides(p, argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from unimlip_train.config.load import load_config
    from unimlip_train.config.origins import ConfigError
    from unimlip_train.data.augment import check_augment
    from unimlip_train.models.pretrained import resolve_towers

    out = Path(args.out).resolve()
    shards = out / "shards"
    overrides = [f"data.train={shards}/index.json", f"data.val={shards}/index.json", f"train.steps={args.steps}",
                 *args.overrides]
    runs = {"default": (args.config, out / "run")}
    if not args.no_baseline:
        runs[Path(args.baseline).stem] = (args.baseline, out / f"run_{Path(args.baseline).stem}")
    try:
        cfgs = {name: load_config(path, overrides, resolve=(resolve_towers, check_augment))
                for name, (path, _) in runs.items()}
    except ConfigError as e:
        p.exit(2, f"unimlip-demo: config error: {e}\n")
    cfg = cfgs["default"]
    t0 = time.time()
    if not (shards / "index.json").is_file():
        _run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", str(args.samples),
              "--image-size", str(cfg.data.image_size), "--max-size", str(cfg.data.image_size),
              "--val-fraction", str(args.val_fraction), "--shard-size", "250", "--out", str(shards), "--no-progress"],
             "synthesize + shard")
    results, checkpoints, restarts = {}, {}, 0
    for name, (path, run_dir) in runs.items():
        restarts += _train(args, name, path, run_dir, overrides)
        results[name], checkpoints[name] = _evaluate(run_dir, cfgs[name])
    metrics = results["default"]
    print(f"\nheld-out retrieval ({int(metrics['num_samples'])} pairs, split '{cfg.eval.split}', {args.steps} steps "
          f"each; chance R@1 {metrics['chance_R@1']:.2f}):")
    print("  " + f"{'':12s}" + "".join(f"{k.replace('_', ' '):>12s}" for k in METRICS))
    for name, m in results.items():
        print("  " + f"{name:12s}" + "".join(f"{m[k]:12.2f}" for k in METRICS))
    rounded = {name: {k: round(v, 4) for k, v in m.items()} for name, m in results.items()}
    table = {"pairs": int(metrics["num_samples"]), "steps": args.steps, "nproc": args.nproc,
             "chance_R@1": rounded["default"]["chance_R@1"],
             "rows": {name: {k: m[k] for k in METRICS} for name, m in rounded.items()}}
    (out / TABLE_FILE).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    run_dir, checkpoint = runs["default"][1], checkpoints["default"]
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"checkpoint:  {checkpoint}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}   ({time.time() - t0:.0f} s in total)")
    others = {name: m for name, m in rounded.items() if name != "default"}
    print(json.dumps({**rounded["default"], "checkpoint": checkpoint, "tensorboard": str(run_dir / "tb"),
                      "steps": args.steps, "nproc": args.nproc, "restarts": restarts, **others}))
    return 0


def _train(args, name: str, config: str, run_dir: Path, overrides: list[str]) -> int:
    """Train ``config`` from scratch into ``run_dir`` under torchrun; a crashed job resumes from its latest
    complete checkpoint (twice at most). Returns the number of restarts."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from scratch
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
             "-m", "unimlip_train.cli.train", "--config", config, "--run-dir", str(run_dir), *overrides]
    code = _run(train, f"train {name} ({args.nproc} processes)", check=False)
    restarts = 0
    while code != 0 and restarts < 2:
        restarts += 1
        print(f"[demo] training exited with {code}; resuming from the latest checkpoint (restart {restarts} of 2)")
        code = _run(train, f"resume training {name}", check=restarts == 2)
    return restarts


def _evaluate(run_dir: Path, cfg) -> tuple[dict, str]:
    """Held-out retrieval of the run's final checkpoint (one process), and the checkpoint's path."""
    from unimlip_train.eval.validate import validate
    from unimlip_train.export import load_for_eval, resolve_checkpoint

    checkpoint = resolve_checkpoint(str(run_dir))
    model, _, tokenizer = load_for_eval(checkpoint)
    return validate(model, cfg, tokenizer, rank=0, world_size=1), checkpoint


if __name__ == "__main__":
    sys.exit(main())
