"""The README's demo table against what ``unimlip-demo`` printed: check it, or write it in.

``unimlip-demo --out DIR`` writes the table it prints to ``DIR/demo_table.json``. This script compares that file with
the table between the README's ``<!-- demo-table -->`` markers (to the one decimal the README shows), or replaces the
table with it, so refreshing the README after a change to the objective is one command:

    python bench/readme_demo.py --check demo_out          # exit 1, both tables printed, when they differ
    python bench/readme_demo.py --write demo_out          # put demo_out's numbers into README.md
    python bench/readme_demo.py --run                      # run the demo into a temporary folder, then --write

Training is bitwise repeatable on one machine, so on the machine that wrote the table a difference means a change
in the code; another CPU may print other numbers (its float kernels differ), which ``--check`` reports the same way.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from unimlip_train.cli.demo import METRICS as COLUMNS
from unimlip_train.cli.demo import TABLE_FILE

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- demo-table -->\n)(.*?)(<!-- /demo-table -->)", re.S)
NAMES = {"default": "Uni-Mlip, every term but ITM (the default)", "clip_only": "CLIP only"}


def render(table: dict) -> str:
    """The README's markdown table for a demo table (one decimal, as printed there)."""
    head = " | ".join(c.replace("_", " ").replace("i2t", "i→t").replace("t2i", "t→i") for c in COLUMNS)
    lines = [f"| | {head} |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {NAMES.get(name, name)} | " + " | ".join(f"{row[c]:.1f}" for c in COLUMNS) + " |"
              for name, row in table["rows"].items()]
    return "\n".join(lines) + f"\n\n{table['pairs']} held-out pairs, {table['steps']} steps each, chance R@1 " \
                              f"{table['chance_R@1']:.1f}.\n"


def parse(shown: str) -> dict:
    """A demo table back from its rendering (to the README's one decimal)."""
    lines = shown.splitlines()
    names = {v: k for k, v in NAMES.items()}
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[names.get(cells[0], cells[0])] = dict(zip(COLUMNS, map(float, cells[1:])))
    foot = re.search(r"(\d+) held-out pairs, (\d+) steps each, chance R@1 (\d+(?:\.\d+)?)", shown)
    if not foot:
        raise SystemExit("demo table without its footer line ('N held-out pairs, S steps each, chance R@1 C')")
    return {"pairs": int(foot[1]), "steps": int(foot[2]), "chance_R@1": float(foot[3]), "rows": rows}


def readme_table(text: str) -> str:
    match = BLOCK.search(text)
    if not match:
        raise SystemExit(f"{README}: no <!-- demo-table --> ... <!-- /demo-table --> block")
    return match.group(2)


def check(readme: str, table: dict) -> str:
    """'' when the README shows ``table``, else both tables."""
    shown, printed = readme_table(readme), render(table)
    return "" if shown == printed else f"README.md shows:\n{shown}\nthe demo printed:\n{printed}"


def write(readme: str, table: dict) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(table) + m.group(3), readme, count=1)


def load(demo_out: str) -> dict:
    path = Path(demo_out) / TABLE_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `unimlip-demo --out {demo_out}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="DEMO_OUT", help="compare DEMO_OUT/demo_table.json with the README")
    mode.add_argument("--write", metavar="DEMO_OUT", help="write DEMO_OUT/demo_table.json into the README")
    mode.add_argument("--run", action="store_true", help="run unimlip-demo (defaults) into a temporary folder, then write")
    args = p.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    if args.check:
        difference = check(readme, load(args.check))
        print(difference or "README.md's demo table matches what the demo printed")
        return 1 if difference else 0
    source = args.write
    if args.run:
        source = tempfile.mkdtemp(prefix="unimlip-demo-")
        subprocess.run([sys.executable, "-m", "unimlip_train.cli.demo", "--out", source], check=True)
    README.write_text(write(readme, load(source)), encoding="utf-8")
    print(f"README.md's demo table written from {Path(source) / TABLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
