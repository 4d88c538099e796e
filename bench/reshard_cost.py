"""Time and peak memory of ``unimlip-checkpoint reshard`` for the production model, against DeepSpeed's own
weights-only consolidation (``zero_to_fp32``) of the same checkpoint, in the same run.

The model is ``configs/vitb16_biomedbert.yaml`` with random weights (nothing downloads): ViT-B/16 at 224 px and a
BERT-base text tower (12 layers, width 768, a 30522-token vocabulary like BiomedBERT's), the fusion encoder and
heads, every Uni-Mlip term on. Two CPU ranks train one step (micro batch 2) under the config's bf16 / ZeRO-2, so
the checkpoint holds real Adam state; then, each in its own process, one at a time:
  zero_to_fp32   DeepSpeed's consolidation of the fp32 weights only (the baseline);
  reshard        ``unimlip-checkpoint reshard --world-size 8``: weights, master weights, both Adam moments,
                 every rank's random state and the data stream's view, written as safetensors.
Each line gives the wall time and the peak resident memory of that process (``wait4``), and the ratio to the
baseline. Usage: python bench/reshard_cost.py [--world-size 8] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BERT_BASE = "{hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072, " \
            "max_position_embeddings: 512}"


def run_measured(cmd: list, env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of ``cmd`` as one child process, waited for with ``wait4``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, out


def write_tokenizer(folder: Path) -> None:
    """A WordPiece vocabulary of BERT-base's size (5 special tokens and made-up words)."""
    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = special + [f"w{i}" for i in range(30522 - len(special))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=8, help="ranks of the resharded checkpoint (default 8)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="reshard_cost_"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    py = sys.executable
    try:
        if not (work / "shards").is_dir():
            subprocess.run([py, "-m", "data_prep.cli", "synthetic", "--n", "16", "--image-size", "224", "--out",
                            str(work / "shards"), "--workers", "1", "--no-progress", "--no-audit"], env=env,
                           check=True, capture_output=True)
            write_tokenizer(work / "tok")
        run = work / "run"
        if not (run / "checkpoints" / "latest").is_file():
            overrides = [f"data.train={work / 'shards' / 'index.json'}", "data.val=", "data.num_workers=1",
                         "data.shuffle_buffer=8", "model.image.name=vit_base_patch16_224", "model.image.pretrained=",
                         "model.text.name=", f"model.text.config={BERT_BASE}", f"model.tokenizer={work / 'tok'}",
                         "train.micro_batch_size=2", "train.steps=1", "train.eval_every=0", "train.warmup_steps=1",
                         "data.image_size=224"]
            wall, rss, _ = run_measured([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                         "-m", "unimlip_train.cli.train", "--config",
                                         str(REPO / "configs" / "vitb16_biomedbert.yaml"), "--run-dir", str(run),
                                         *overrides], env)
            print(f"trained 1 step on 2 CPU ranks (bf16, ZeRO-2) in {wall:.0f} s")
        tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        state = json.loads((tag / "trainer_state.json").read_text())
        elements = sum(math.prod(s) for s in state["param_shapes"].values())
        print(f"checkpoint {tag}: {elements / 1e6:.1f} M parameters, {size / 2**30:.2f} GiB on disk")
        base_code = ("from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as f; "
                     f"sd = f({str(tag.parent)!r}, tag={tag.name!r}); print(len(sd))")
        base_wall, base_rss, _ = run_measured([py, "-c", base_code], env)
        out = work / "resharded"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = run_measured([py, "-m", "unimlip_train.cli.checkpoint", "reshard", str(tag), "--world-size",
                                     str(args.world_size), "--out", str(out)], env)
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{'zero_to_fp32 (weights only)':32s} {base_wall:6.1f} s  peak RSS {base_rss:5.2f} GiB")
        print(f"{'reshard (weights + Adam state)':32s} {wall:6.1f} s  peak RSS {rss:5.2f} GiB  "
              f"({wall / base_wall:.2f}x the time, {rss / base_rss:.2f}x the memory; wrote {written / 2**30:.2f} GiB)")
        print(json.dumps({"parameters_m": round(elements / 1e6, 1), "checkpoint_gib": round(size / 2**30, 2),
                          "reshard_s": round(wall, 1), "reshard_peak_rss_gib": round(rss, 2),
                          "zero_to_fp32_s": round(base_wall, 1), "zero_to_fp32_peak_rss_gib": round(base_rss, 2),
                          "world_size": args.world_size}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
