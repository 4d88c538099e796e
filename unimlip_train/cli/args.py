"""``key.sub=value`` config overrides anywhere on a command line, before, between or after options.

argparse gives a ``nargs="*"`` positional only its first run of values: ``--config C a=1 --run-dir D b=2``
would leave ``b=2`` unrecognised. Every CLI that takes overrides parses through here instead.
"""
from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

# A command-line override looks like ``key.sub=value``; a config path never matches (it has a '/' or no '=').
OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def is_override(token: str) -> bool:
    return bool(OVERRIDE_RE.match(token))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; every leftover ``key=value`` joins ``args.overrides`` in command-line order. Anything
    else left over (an unknown option, a stray word, overrides for a sub-command without them) is the usual
    argparse usage error."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
