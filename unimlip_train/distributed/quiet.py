"""DeepSpeed's routine output, filtered line by line, and its one op build shared by every command of a venv.

What goes: the per-rank "DeepSpeed ... built successfully" line of its CPU communication op, torch's
``all_gather_into_tensor`` deprecation FutureWarning that DeepSpeed's ZeRO triggers on every rank. Only those
exact lines are dropped: any other output, and any other warning, passes unchanged.

The op build (60-90 s on a CPU machine) lands in ``TORCH_EXTENSIONS_DIR``, which defaults to ``torch_extensions``
under the venv (as the tests use), and the venv's own ninja goes first on ``PATH``: torch's default folder is one
per user, shared by every venv, so two venvs (or a shell without the venv activated, finding another ninja) kept
rebuilding it over each other.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from typing import Iterator, TextIO

#: Lines of DeepSpeed's that say nothing the run's own messages do not.
OP_BUILT = re.compile(r"^DeepSpeed \S+ built successfully$")


def share_op_build() -> None:
    """One build of DeepSpeed's JIT op per venv (see the module doc); a ``TORCH_EXTENSIONS_DIR`` already set wins."""
    bin_dir = os.path.dirname(sys.executable)
    if sys.prefix != sys.base_prefix and "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def drop_deprecation_noise() -> None:
    """torch's deprecation of ``all_gather_into_tensor``, which DeepSpeed calls (not this project): ignored."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


class _LineFilter(io.TextIOBase):
    """A text stream that forwards whole lines to ``target`` unless ``pattern`` matches them."""

    def __init__(self, target: TextIO, pattern: re.Pattern):
        super().__init__()
        self.target, self.pattern, self.pending = target, pattern, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.pattern.search(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_out(self) -> None:
        if self.pending and not self.pattern.search(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def without_lines(pattern: re.Pattern) -> Iterator[None]:
    """Inside the block, lines of stdout and stderr that ``pattern`` matches are dropped."""
    out, err = _LineFilter(sys.stdout, pattern), _LineFilter(sys.stderr, pattern)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.close_out()
        err.close_out()
