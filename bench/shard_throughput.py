"""Sharding throughput: the unimlip shard writer vs a minimal single-process writer, in the same run.

Both do the same work per image (decode a large JPEG, resize the long side to --max-size with Lanczos,
encode JPEG at quality 95, write image + report + JSON into a tar). The baseline is the plain loop a
person would write; the writer adds planning, deterministic tar headers, journalling and a process pool,
and saves work where it can (JPEGs decoded at a reduced DCT scale, Lanczos with a reducing gap).
Printed: images/s of each, writer/baseline ratios, and the speed-up of 2 processes over 1; also CPU ms per
image (process + pool children), which stays meaningful when other jobs share the cores.

    python bench/shard_throughput.py [--n 160] [--size 1536] [--max-size 512]
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from data_prep.options import WriterOptions
from data_prep.writer import write_shards
from unimlip_train.format.rows import Row


def make_sources(root: Path, n: int, size: int) -> list[Row]:
    """A few distinct smooth grayscale JPEGs (radiograph-like content compresses like real films), n rows."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        noise = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8), dtype=np.uint8))
        img = noise.resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        path = root / f"src{i}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return [Row(id=f"row{i:05d}", image=str(paths[i % len(paths)]), text=f"Report {i}: no acute process.",
                group=f"g{i}") for i in range(n)]


def baseline(rows: list[Row], out: Path, max_size: int) -> None:
    """The minimal writer: one process, one tar, no resumability."""
    with tarfile.open(out / "baseline.tar", "w") as tar:
        for row in rows:
            with Image.open(row.image) as im:
                im = im.convert("L")
                scale = max_size / max(im.size)
                if scale < 1:
                    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=95)
            for ext, data in (("jpg", buf.getvalue()), ("txt", row.text.encode()),
                              ("json", json.dumps({"group": row.group}).encode())):
                info = tarfile.TarInfo(f"{row.id}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children: robust on a busy machine)."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=160, help="images per run (default 160)")
    parser.add_argument("--size", type=int, default=1536, help="side of the source JPEGs (default 1536)")
    parser.add_argument("--max-size", type=int, default=512, help="--max-size of the writer (default 512)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = make_sources(root, args.n, args.size)
        rates, cpu_ms = {}, {}
        for name, run in [
            ("baseline", lambda out: baseline(rows, out, args.max_size)),
            ("writer_1proc", lambda out: write_shards(rows, out, WriterOptions(max_size=args.max_size, workers=1,
                                                                                 val_fraction=0), "bench", {}, False)),
            ("writer_2proc", lambda out: write_shards(rows, out, WriterOptions(max_size=args.max_size, workers=2,
                                                                                 val_fraction=0), "bench", {}, False)),
        ]:
            out = root / name
            out.mkdir()
            wall, used = timed(lambda: run(out))
            rates[name], cpu_ms[name] = args.n / wall, 1000 * used / args.n
            print(f"{name:>14}: {rates[name]:7.1f} images/s, {cpu_ms[name]:6.1f} CPU ms/image")
    result = {
        "images": args.n, "source_px": args.size, "max_size": args.max_size,
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "cpu_ms_per_image": {k: round(v, 2) for k, v in cpu_ms.items()},
        "writer_1proc_vs_baseline": round(rates["writer_1proc"] / rates["baseline"], 2),
        "writer_2proc_vs_baseline": round(rates["writer_2proc"] / rates["baseline"], 2),
        "speedup_2proc_vs_1proc": round(rates["writer_2proc"] / rates["writer_1proc"], 2),
    }
    print(f"writer(1 proc) / baseline = {result['writer_1proc_vs_baseline']:.2f}x; "
          f"writer(2 procs) / baseline = {result['writer_2proc_vs_baseline']:.2f}x; "
          f"2 procs / 1 proc = {result['speedup_2proc_vs_1proc']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
