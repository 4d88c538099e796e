"""The shard writer's options, and the ``unimlip-shard`` arguments every sharding subcommand shares to set them.

Kept apart from the writer so that the SLURM array (``launch.sharding``) plans with the very options a
single-process run would use. ``WriterOptions.content()`` is the part that shapes shard bytes: it is recorded
in ``index.json`` and in the resume journal's fingerprint.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import asdict, dataclass

from data_prep.images import WINDOWS
from unimlip_train.format.limits import DEFAULT_MAX_IMAGE_PIXELS
from unimlip_train.format.rows import InputError


@dataclass(frozen=True)
class WriterOptions:
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    shard_size: int = 1000
    shard_bytes: int = 1_000_000_000
    max_size: int = 512
    jpeg_quality: int = 95
    keep_16bit: bool = False
    window: str = "auto"
    frame: int = 0
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    workers: int = 1
    audit: bool = True

    def content(self) -> dict:
        """Options that change shard bytes (``workers`` and ``audit`` do not)."""
        d = asdict(self)
        d.pop("workers")
        d.pop("audit")
        return d


def parse_bytes(text: str) -> int:
    """Parse a size such as ``1000000``, ``512M`` or ``1G`` (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000000, 512M, 1G)")
    return int(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")


def pixel_limit(text: str) -> int:
    """``--max-pixels``: a pixel count (``40000000``, ``40M``) >= 0; 0 turns the limit off."""
    m = re.fullmatch(r"\s*(\d+)\s*([mM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r} (examples: 40000000, 40M, 0 for no limit)")
    return int(m.group(1)) * (1_000_000 if m.group(2) else 1)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_writer_arguments(parser: argparse.ArgumentParser, val_fraction: float = 0.05) -> None:
    """Options shared by every sharding subcommand."""
    g = parser.add_argument_group("shard writer")
    g.add_argument("--out", required=True, help="output directory for shards, index.json and errors.jsonl")
    g.add_argument("--seed", type=int, default=0, help="seed of the group-based split (default 0)")
    g.add_argument("--val-fraction", type=float, default=val_fraction,
                   help=f"fraction of groups (patients) held out for validation (default {val_fraction})")
    g.add_argument("--test-fraction", type=float, default=0.0, help="fraction of groups held out for test (default 0)")
    g.add_argument("--shard-size", type=_positive, default=1000, help="max samples per shard (default 1000)")
    g.add_argument("--shard-bytes", type=parse_bytes, default=1_000_000_000,
                   help="max bytes per shard, e.g. 512M or 1G (default 1000000000)")
    g.add_argument("--max-size", type=_positive, default=512,
                   help="resize so the long side is at most PX (default 512)")
    g.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="Q",
                   help="JPEG quality 1-100 for 8-bit images (default 95)")
    g.add_argument("--keep-16bit", action="store_true",
                   help="store 16-bit sources (DICOM, 16-bit PNG) as 16-bit PNG instead of mapping them to 8 bits")
    g.add_argument("--window", choices=WINDOWS, default="auto",
                   help="how 16-bit PNG/TIFF values map onto the output range: auto = 0.5..99.5th percentiles "
                        "(default), minmax = the image's min..max, none = as stored; DICOM uses its own window")
    g.add_argument("--frame", type=int, default=0, metavar="K",
                   help="frame of multi-frame DICOM objects to use, 0-based (default 0: the first); the frame "
                        "count is kept in the metadata")
    g.add_argument("--max-pixels", type=pixel_limit, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"skip (with the reason in errors.jsonl) an image of more than N pixels, read from its "
                        f"header before decoding: a decompression bomb (default {DEFAULT_MAX_IMAGE_PIXELS:,}, 40M: "
                        "above any radiograph; 0: no limit)")
    g.add_argument("--no-audit", action="store_true",
                   help="skip the duplicate / cross-split leak audit of the finished set (unimlip-shard audit)")
    g.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1),
                   help="decode/encode processes (default: CPU count, at most 8); output does not depend on it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace shards in --out made from other inputs or options (default: refuse)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> WriterOptions:
    if args.frame < 0:
        raise InputError(f"--frame {args.frame}: must be >= 0")
    if not 0 <= args.val_fraction < 1 or not 0 <= args.test_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        raise InputError(f"--val-fraction {args.val_fraction} and --test-fraction {args.test_fraction}: "
                         "each must be in [0, 1) and their sum below 1")
    return WriterOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                         shard_size=args.shard_size, shard_bytes=args.shard_bytes, max_size=args.max_size,
                         jpeg_quality=args.jpeg_quality, keep_16bit=args.keep_16bit, window=args.window,
                         frame=args.frame, max_pixels=args.max_pixels, workers=args.workers, audit=not args.no_audit)
