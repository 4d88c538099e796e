"""``unimlip-shard``: shard image-report datasets into WebDataset tars, verify them, build a tokenizer.

The command itself (its parser, sub-commands and exit statuses) is ``data_prep.cli``, the offline tool's own
entry point: ``launch.sharding`` reuses that parser and its adapters to run the same command as a SLURM job
array, and launch never imports this package.
"""
from __future__ import annotations

import sys

from data_prep.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
