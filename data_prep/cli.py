"""``unimlip-shard``: shard image-report datasets into WebDataset tars, verify them, build a tokenizer.

Exit status: 0 the run finished (skipped rows are listed in errors.jsonl, not failures); 2 unusable input
(bad manifest, missing column, missing input path); 1 anything else (including a run interrupted by Ctrl-C or
SIGTERM, which prints one line, or a full disk; the same command finishes either when rerun). ``verify`` exits 1
when it finds a problem, ``audit --fail-on-leak`` when it finds a leak or a sample it cannot read.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from data_prep import audit, synthetic, synthetic_vqa
from data_prep.options import add_writer_arguments, options_from_args, pixel_limit
from data_prep.pool import encode_results
from data_prep.tokenizer_build import build_tokenizer
from data_prep.verify import verify_dir
from data_prep.writer import OutOfSpace, write_shards
from unimlip_train.format.limits import DEFAULT_MAX_IMAGE_PIXELS
from unimlip_train.format.rows import InputError
from unimlip_train.format.shards import SHARD_NAME

# Subcommand -> adapter module name (each module offers add_arguments(parser) and iter_rows(args)).
# launch/sharding.py imports adapters through this mapping too.
ADAPTERS = {
    "manifest": "data_prep.adapters.manifest",
    "iu-xray": "data_prep.adapters.iu_xray",
    "mimic-cxr": "data_prep.adapters.mimic_cxr",
    "roco": "data_prep.adapters.roco",
    "vqa-rad": "data_prep.adapters.vqa_rad",
    "slake": "data_prep.adapters.slake",
    "vqa-manifest": "data_prep.adapters.vqa_manifest",
}
_HELP = {
    "manifest": "CSV/TSV/JSONL manifest with columns image, text (+ id, group, labels, view, ...)",
    "iu-xray": "IU X-ray / Open-I: report XMLs joined to a PNG folder",
    "mimic-cxr": "MIMIC-CXR style: DICOM files + one report .txt per study",
    "roco": "ROCO style: image folder + captions file",
    "vqa-rad": "VQA-RAD: its question JSON + image folder (official train/test kept)",
    "slake": "SLAKE: train/validate/test.json + imgs/ (official splits kept, English)",
    "vqa-manifest": "VQA manifest (CSV/TSV/JSONL): image, question, answer, answer_type, split",
}
# Recorded in index.json: options that shape the output, not where it went or how fast it was made.
_NOT_RECORDED = {"out", "workers", "no_progress", "overwrite", "no_audit", "func", "command"}


def _args_record(args: argparse.Namespace) -> dict:
    plain = (str, int, float, bool, type(None), list, dict)
    return {k: (v if isinstance(v, plain) else str(v)) for k, v in sorted(vars(args).items()) if k not in _NOT_RECORDED}


def _summary(index: dict, out: str) -> str:
    parts = ", ".join(f"{split} {info['samples']} in {len(info['shards'])} shards"
                      for split, info in index["splits"].items())
    dropped = f", {index['dropped_views']} study views dropped" if index.get("dropped_views") else ""
    line = (f"wrote {index['samples']} samples to {out} ({parts}); {index['errors']} rows skipped{dropped}"
            + (f" (reasons in {Path(out) / 'errors.jsonl'})" if index["errors"] or dropped else ""))
    found = index.get("audit")
    if found:
        line += ("\naudit: " + ", ".join(f"{k.replace('_', ' ')} {found[k]}" for k in audit.KINDS)
                 + f"; {found['leaks']} cross-split leaks" + (" (index.json 'audit' lists them)" if found["leaks"] else ""))
    return line


def run_adapter(name: str, adapter, args: argparse.Namespace, encoder=encode_results) -> int:
    """Shard one adapter's rows; ``encoder`` computes the images (a SLURM array's merge replays its tasks')."""
    options = options_from_args(args)
    index = write_shards(adapter.iter_rows(args), args.out, options, source=name,
                         args_record=_args_record(args), progress=not args.no_progress, encoder=encoder,
                         overwrite=args.overwrite)
    print(_summary(index, args.out))
    if index["samples"] == 0:  # e.g. a wrong image folder: every row skipped
        raise InputError(f"no usable rows: all {index['errors']} were skipped "
                         f"(reasons in {Path(args.out) / 'errors.jsonl'})")
    return 0


def _run_adapter(name: str, adapter) -> Callable[[argparse.Namespace], int]:
    return lambda args: run_adapter(name, adapter, args)


def _run_generated(name: str, module) -> Callable[[argparse.Namespace], int]:
    """A generated set (synthetic, synthetic-vqa): shard it, then drop the generated source images."""
    def run(args: argparse.Namespace) -> int:
        if args.n < 1 or args.image_size < 16:
            raise InputError(f"--n must be >= 1 and --image-size >= 16 (got {args.n}, {args.image_size})")
        try:
            return run_adapter(name, module, args)
        finally:  # also after a failure: a rerun generates the (deterministic) images again
            shutil.rmtree(Path(args.out) / synthetic.SOURCE_DIR, ignore_errors=True)
    return run


def _run_verify(args: argparse.Namespace) -> int:
    report = verify_dir(args.dir, decode=args.decode, progress=not args.no_progress, max_pixels=args.max_pixels)
    for p in report.problems:
        print(p)
    summary = report.summary(args.decode)
    if report.problems:
        print(f"{args.dir}: {len(report.problems)} problem(s), {summary['bad_samples']} bad sample(s)", file=sys.stderr)
    else:
        print(f"{args.dir}: OK")
    print(json.dumps(summary))
    return 1 if report.problems else 0


def _run_audit(args: argparse.Namespace) -> int:
    if args.near_threshold < 0 or args.near_threshold > 32:
        raise InputError(f"--near-threshold {args.near_threshold}: must be 0..32 bits")
    problems: list[str] = []
    try:
        sets = [audit.read_set(d, problems, progress=not args.no_progress) for d in args.sets]
        against = [audit.read_set(d, problems, progress=not args.no_progress) for d in args.against]
    except ValueError as e:
        raise InputError(str(e)) from None
    result = audit.audit(sets, against, args.near_threshold)
    result["summary"].update(not_audited=len(problems), not_audited_examples=problems[:audit.EXAMPLES])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(finding, ensure_ascii=False) + "\n" for finding in result["findings"])
    for problem in problems:
        print(problem, file=sys.stderr)
    print(audit.table(result["summary"], result["findings"]))
    if problems:
        print(f"{len(problems)} sample(s) or shard(s) could not be read and were not audited (listed on stderr)")
    print(json.dumps(result["summary"], ensure_ascii=False))
    # A gate must not pass data it could not read: with --fail-on-leak, unread samples fail it too.
    return 1 if args.fail_on_leak and (result["summary"]["leaks"] or problems) else 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    size = build_tokenizer(args.data, args.out, vocab_size=args.vocab_size, split=args.split)
    print(f"wrote a WordPiece tokenizer with {size} tokens to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unimlip-shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in ADAPTERS.items():
        adapter = importlib.import_module(module_name)
        p = sub.add_parser(name, help=_HELP[name], description=(adapter.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        adapter.add_arguments(p)
        add_writer_arguments(p)
        p.set_defaults(func=_run_adapter(name, adapter))

    for name, module, test_fraction, what in (
            ("synthetic", synthetic, 0.0, "the synthetic chest X-ray-like dataset"),
            ("synthetic-vqa", synthetic_vqa, 0.2, "synthetic VQA on those images (answers decided by the image)")):
        p = sub.add_parser(name, help=f"generate and shard {what}", description=(module.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        add_writer_arguments(p, val_fraction=0.1)
        p.set_defaults(func=_run_generated(name, module), test_fraction=test_fraction)

    p = sub.add_parser("verify", help="check shards against index.json (sizes, sha256, counts, duplicate keys)")
    p.add_argument("dir", help="shard directory (with index.json)")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--max-pixels", type=pixel_limit, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"with --decode: an image above N pixels is a bad sample, found from its header "
                        f"(default {DEFAULT_MAX_IMAGE_PIXELS}, as training's data.max_image_pixels; 0: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_verify)

    p = sub.add_parser("audit", help="find duplicate images/reports and patients shared across splits or sets",
                       description=(audit.__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", metavar="SET", help="shard directories (with index.json) to audit")
    p.add_argument("--against", nargs="+", default=[], metavar="EVAL",
                   help="evaluation shard sets: only overlaps between SETs and these count as cross-set leaks")
    p.add_argument("--near-threshold", type=int, default=audit.DEFAULT_NEAR_THRESHOLD, metavar="BITS",
                   help=f"perceptual-hash bits within which two images are near duplicates "
                        f"(default {audit.DEFAULT_NEAR_THRESHOLD})")
    p.add_argument("--fail-on-leak", action="store_true",
                   help="exit 1 when any cross-split or cross-set leak exists, or any sample could not be read")
    p.add_argument("--out", default="", metavar="FILE", help="write every finding as JSON lines to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_audit)

    p = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on the reports of a shard set")
    p.add_argument("--data", required=True, help="shard directory (index.json) or folder of .tar shards")
    p.add_argument("--out", required=True, help="output folder (loadable with AutoTokenizer.from_pretrained)")
    p.add_argument("--vocab-size", type=int, default=4000, help="target vocabulary size (default 4000)")
    p.add_argument("--split", default="train", help="split to read from index.json, or 'all' (default train)")
    p.set_defaults(func=_run_tokenizer)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, ``timeout``) ends the run like Ctrl-C: the workers finish the images in hand,
    the shard being written is removed, the finished ones stay journalled."""


def _interrupt(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _interrupted(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """The one line an interrupted run prints: what is kept, and how to finish."""
    how = f"by {e.args[0]}" if isinstance(e, Interrupted) else "by Ctrl-C"
    out = getattr(args, "out", None)
    if not out or args.command == "tokenizer":
        return f"unimlip-shard: interrupted {how}"
    kept = sum(1 for p in Path(out).glob("*.tar") if SHARD_NAME.match(p.name)) if Path(out).is_dir() else 0
    return (f"unimlip-shard: interrupted {how}; {kept} finished shard(s) kept in {out} (none half-written): "
            "rerun the same command to finish")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return args.func(args)
    except InputError as e:
        print(f"unimlip-shard: error: {e}", file=sys.stderr)
        return 2
    except OutOfSpace as e:
        print(f"unimlip-shard: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(_interrupted(args, e), file=sys.stderr)
        return 1
    except Exception as e:
        traceback.print_exc()
        print(f"unimlip-shard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
