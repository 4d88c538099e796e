"""``unimlip-shard``: shard image-report datasets into WebDataset tars, verify them, build a tokenizer.

Exit status: 0 the run finished (skipped rows are listed in errors.jsonl, not failures); 2 unusable input
(bad manifest, missing column, missing input path); 1 anything else (including an interrupted run, which
the same command finishes when rerun).
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from data_prep import synthetic, synthetic_vqa
from data_prep.rows import InputError
from data_prep.writer import add_writer_arguments, encode_results, options_from_args, write_shards

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
_NOT_RECORDED = {"out", "workers", "no_progress", "overwrite", "func", "command"}


def _args_record(args: argparse.Namespace) -> dict:
    plain = (str, int, float, bool, type(None), list, dict)
    return {k: (v if isinstance(v, plain) else str(v)) for k, v in sorted(vars(args).items()) if k not in _NOT_RECORDED}


def _summary(index: dict, out: str) -> str:
    parts = ", ".join(f"{split} {info['samples']} in {len(info['shards'])} shards"
                      for split, info in index["splits"].items())
    return (f"wrote {index['samples']} samples to {out} ({parts}); {index['errors']} rows skipped"
            + (f" (reasons in {Path(out) / 'errors.jsonl'})" if index["errors"] else ""))


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
        code = run_adapter(name, module, args)
        shutil.rmtree(Path(args.out) / synthetic.SOURCE_DIR, ignore_errors=True)
        return code
    return run


def _run_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify_dir

    problems = verify_dir(args.dir, decode=args.decode, progress=not args.no_progress)
    for p in problems:
        print(p)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK")
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.tokenizer_build import build_tokenizer

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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_verify)

    p = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on the reports of a shard set")
    p.add_argument("--data", required=True, help="shard directory (index.json) or folder of .tar shards")
    p.add_argument("--out", required=True, help="output folder (loadable with AutoTokenizer.from_pretrained)")
    p.add_argument("--vocab-size", type=int, default=4000, help="target vocabulary size (default 4000)")
    p.add_argument("--split", default="train", help="split to read from index.json, or 'all' (default train)")
    p.set_defaults(func=_run_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        return args.func(args)
    except InputError as e:
        print(f"unimlip-shard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unimlip-shard: interrupted; rerun the same command to finish the missing shards", file=sys.stderr)
        return 1
    except Exception as e:
        traceback.print_exc()
        print(f"unimlip-shard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
