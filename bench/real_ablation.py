"""The real-data ablation (issues 9 and 21): CLIP only vs Uni-Mlip on real chest X-rays with real reports.

PneumoniaMNIST's 2,428 train images train and its 270 val images evaluate (the official split, kept by
sharding the two arrays separately), each paired by class with a real IU X-ray report of that class
(``data_prep.class_pairs``, the rule ``tests/test_real_data.py`` uses). A WordPiece vocabulary of 800 is
built from the training reports. ``unimlip-ablate`` then trains ``configs/ablations/clip_only.yaml`` and
``no_itm.yaml`` (the tiny config's own objective) for 300 steps in 2 processes with seeds 0-14 (issue 21's
protocol, sized for paired intervals of about +-2 points; ``--configs`` adds e.g. ``all`` or ``no_text``) and
evaluates zero-shot normal vs pneumonia on the 270 held-out images with prompts written here (not the packaged
ones), also calibrated on the train images without their labels, a linear probe, and retrieval; each row gets its
paired difference to CLIP only.

    python bench/real_ablation.py                       # -> runs/real_ablation/ablation/ablation.{md,json}
    python bench/real_ablation.py --out /tmp/abl --configs clip_only,all --seeds 0,1 --nproc 1 train.lr=5e-4

Everything derived from the IU reports (CC BY-NC-ND 4.0) stays in ``--out``: never commit or share it.
Rerunning continues where it stopped (finished runs are neither retrained nor re-evaluated). The last line
printed is unimlip-ablate's JSON. On the shared 2-core CPU machine the issue-9 run's four trainings took 2 h 15 min
(20-35 min each, beside other work); issue 21's 30 runs took about 95 minutes: see docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# All of PneumoniaMNIST's balanced train/val arrays (the repo's tests/data holds only a 400 + 100 subset).
NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
REPORTS = REPO / "tests" / "data" / "iu_xray_reports" / "NLMCXR_reports.tgz"
ABLATIONS = REPO / "configs" / "ablations"
# Zero-shot prompts the project does not ship (unimlip_train/resources/prompts/ has other wordings).
PROMPTS = """\
# Written by bench/real_ablation.py: zero-shot prompts for PneumoniaMNIST normal vs pneumonia.
templates: ["{}."]
classes:
  normal:
    prompts:
      - "a chest x-ray with no abnormality."
      - "a normal chest radiograph."
      - "no acute findings in the chest."
  pneumonia:
    prompts:
      - "a chest x-ray showing pneumonia."
      - "a chest radiograph with lung consolidation from pneumonia."
      - "an airspace opacity consistent with pneumonia."
"""


def run(cmd: list, what: str) -> None:
    print(f"[real-ablation] {what}", flush=True)
    done = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"real_ablation: {what} failed (exit {done.returncode})")


def split_manifest(manifest: Path, out: Path) -> dict[str, Path]:
    """One manifest per PneumoniaMNIST array, so each array becomes its own shard set (the official split)."""
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    parts = {}
    for part in ("train", "val"):
        path = out / f"manifest_{part}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r["source_split"] == part)
        parts[part] = path
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "real_ablation"), help="output folder (default runs/real_ablation)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--configs", default="clip_only,no_itm",
                   help="configs/ablations/ names, the first the baseline (default clip_only,no_itm)")
    p.add_argument("--seeds", default=",".join(map(str, range(15))),
                   help="seeds (default 0-14: the size that gives paired intervals of about +-2 points, issue 21)")
    p.add_argument("--nproc", type=int, default=2, help="training processes per run (default 2, the demo's)")
    p.add_argument("--npz", default=str(NPZ), help=f"PneumoniaMNIST train/val arrays (default {NPZ})")
    p.add_argument("--reports", default=str(REPORTS), help=f"IU X-ray report XMLs, .tgz (default {REPORTS})")
    p.add_argument("extra", nargs="*", help="more unimlip-ablate options or key.sub=value overrides")
    args, unknown = p.parse_known_args()
    configs = [ABLATIONS / f"{name.strip()}.yaml" for name in args.configs.split(",")]
    for path in (args.npz, args.reports, *configs):
        if not Path(path).is_file():
            p.error(f"not found: {path}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    from data_prep.class_pairs import write_class_paired_manifest

    pairs = out / "pairs"
    if not (pairs / "manifest.csv").is_file():
        print("[real-ablation] pairing every PneumoniaMNIST train/val image with an IU X-ray report of its class",
              flush=True)
        write_class_paired_manifest(pairs, Path(args.npz), Path(args.reports))
    manifests = split_manifest(pairs / "manifest.csv", pairs)
    shards = {part: out / f"shards_{part}" for part in manifests}
    for part, manifest in manifests.items():
        # --val-fraction 0: every sample of an array lands in that shard set's 'train' split.
        run([bin_dir / "unimlip-shard", "manifest", "--manifest", manifest, "--images-root", pairs,
             "--out", shards[part], "--val-fraction", "0", "--max-size", "64", "--workers", "1", "--no-progress"],
            f"shard PneumoniaMNIST {part} -> {shards[part]}")
    tokenizer = out / "tokenizer"
    if not (tokenizer / "vocab.txt").is_file():
        run([bin_dir / "unimlip-shard", "tokenizer", "--data", shards["train"], "--out", tokenizer,
             "--vocab-size", "800"], "WordPiece vocabulary of 800 from the training reports")
    prompts = out / "prompts.yaml"
    prompts.write_text(PROMPTS, encoding="utf-8")

    cmd = [bin_dir / "unimlip-ablate", "--configs", *configs, "--baseline", configs[0].stem,
           "--data", shards["train"], "--eval-data", shards["val"], "--eval-split", "train", "--run-root", out / "ablation",
           "--steps", str(args.steps), "--seeds", args.seeds, "--nproc", str(args.nproc),
           "--classes", "normal,pneumonia", "--prompts", prompts, f"model.tokenizer={tokenizer}",
           *args.extra, *unknown]
    print(f"[real-ablation] {' '.join(map(str, cmd))}", flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
