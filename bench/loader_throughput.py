"""Loader throughput per worker: our two-view + tokenization train stream vs baselines, same shards, same run.

Writes 512-px grayscale JPEG shards (chest-X-ray-like) to a temp dir and measures samples/s in one process
(num_workers=0, one thread) for:
  decode_only   WebDataset decode to pixels (PIL), nothing else;
  open_clip     open_clip-style train preprocess, one view: RandomResizedCrop 224 bicubic + tensor + normalize;
  unimlip       our TrainStream at 224 px: two medical views, report cleaning + second text view, tokenization,
                MLM masking, collation into batches.
Repeats are interleaved: each repeat runs the three pipelines once, one after the other (the order rotating
from repeat to repeat), and its ratios compare rates measured moments apart, so a busy moment of the shared
machine touches one repeat, not one pipeline. Each repeat prints its rates and ratios; the last line gives the
median ratio over the repeats (the goal: >= 1.5x open_clip), with the lowest, the highest and all of them.
Rates are per second of wall time and, since everything runs in this one thread, per second of this process's
CPU time (``*_cpu``): the CPU ratio is what an otherwise idle core would give, and moves far less when other
jobs share the machine.
The augmentation is the config default ``data.augment`` (``--augment`` takes another list as YAML).
Usage: python bench/loader_throughput.py [--n 600] [--repeats 7] [--augment YAML]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import webdataset as wds  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

from unimlip_train.config.schema import Config  # noqa: E402
from unimlip_train.data.collate import BatchNeeds  # noqa: E402
from unimlip_train.data.loader import TrainStream  # noqa: E402
from unimlip_train.data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer  # noqa: E402

WORDS = ("the heart size is normal lungs are clear no pleural effusion pneumothorax opacity left right lower "
         "upper lobe small nodule stable chest tube in place findings impression").split()


def write_shards(out: str, n: int) -> list:
    rng = np.random.default_rng(0)
    with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=200, verbose=0) as w:
        for i in range(n):
            coarse = rng.normal(90, 25, (64, 64)).astype(np.float32)
            im = Image.fromarray(cv2.resize(coarse, (512, 512), interpolation=cv2.INTER_CUBIC).clip(0, 255)
                                 .astype(np.uint8))
            ImageDraw.Draw(im).ellipse([100 + i % 200, 150, 220 + i % 200, 300], fill=200)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            report = "FINDINGS: " + ". ".join(" ".join(rng.choice(WORDS, 6)) for _ in range(4)) + \
                     ". IMPRESSION: no acute XXXX process."
            w.write({"__key__": f"k{i:06d}", "jpg": buf.getvalue(), "txt": report, "json": {"labels": []}})
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar"))


def tokenizer_for_bench(folder: str):
    if DEFAULT_TOKENIZER_DIR.is_dir():
        return load_tokenizer("")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ":"] + sorted(set(WORDS)) + ["acute", "process"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return load_tokenizer(folder)


def timed(samples) -> tuple[float, float]:
    """(samples per second of wall time, per second of this process's CPU time)."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for k in samples:
        n += k
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600, help="samples to write and read per pipeline run (default 600)")
    parser.add_argument("--batch", type=int, default=32, help="micro batch of our stream (default 32)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the comparison (default 7)")
    parser.add_argument("--augment", type=yaml.safe_load, default=None, metavar="YAML",
                        help="data.augment list for our stream (default: the config default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = os.path.join(tmp, "shards")
        os.makedirs(shard_dir)
        urls = write_shards(shard_dir, args.n)
        tokenizer = tokenizer_for_bench(os.path.join(tmp, "tok"))

        def wds_stage(fn):
            ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt")
            return (fn(s) for s in ds)

        oc = T.Compose([T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                        T.ToTensor(), T.Normalize((0.48145466,), (0.26862954,))])
        cfg = Config()
        cfg.data.train, cfg.data.num_workers, cfg.data.image_size = shard_dir, 0, 224
        cfg.train.micro_batch_size = args.batch
        if args.augment is not None:
            cfg.data.augment = args.augment
        stream = TrainStream(cfg, tokenizer, BatchNeeds(image_view2=True, text_view2=True, mlm=True), 0, 1)
        batches = iter(stream)
        pipelines = {
            "decode_only": lambda: (1 for _ in wds_stage(lambda s: np.asarray(s[0]))),
            "open_clip_one_view": lambda: (1 for _ in wds_stage(lambda s: oc(s[0].convert("L")))),
            "unimlip_two_views_tokenized": lambda: (len(next(batches)["key"]) for _ in range(stream.steps_per_epoch)),
        }
        ratios, cpu_ratios, names = [], [], list(pipelines)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            rate = {name: timed(pipelines[name]()) for name in order}
            (decode, _), (open_clip, open_clip_cpu), (ours, ours_cpu) = (rate[name] for name in names)
            ratios.append(ours / open_clip)
            cpu_ratios.append(ours_cpu / open_clip_cpu)
            print(json.dumps({"repeat": repeat + 1, **{f"{name}_per_s": round(rate[name][0], 1) for name in names},
                              **{f"{name}_per_cpu_s": round(rate[name][1], 1) for name in names},
                              "unimlip_vs_decode_only": round(ours / decode, 3),
                              "unimlip_vs_open_clip_one_view": round(ratios[-1], 3),
                              "unimlip_vs_open_clip_one_view_cpu": round(cpu_ratios[-1], 3)}), flush=True)
    print(json.dumps({"unimlip_vs_open_clip_one_view_median": round(statistics.median(ratios), 3),
                      "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                      "cpu_median": round(statistics.median(cpu_ratios), 3),
                      "cpu_min": round(min(cpu_ratios), 3), "cpu_max": round(max(cpu_ratios), 3),
                      "all": [round(r, 3) for r in ratios], "cpu_all": [round(r, 3) for r in cpu_ratios]}))


if __name__ == "__main__":
    main()
