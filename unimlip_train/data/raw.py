"""Raw (undecoded) samples: the pieces the epoch plan names, read from their shards.

A unit's window of one source is buffer-shuffled (seeded by (seed, epoch, source, unit)), then continued by
the samples after it: the top-up that keeps a worker whose samples were corrupt from running dry. Each sample
is tagged with its source and its pass / resampling draw, which seed its view choice and augmentation.
Nothing is decoded here, so a resumed stream skips what it consumed at the cost of reading the bytes only.
A piece that ends before its index count (a truncated or garbled tar) yields one placeholder per missing
sample (``MISSING``), which travels like a sample and is counted as skipped where every other loss is counted,
by the decoder (``skips.py``).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import webdataset as wds

from unimlip_train.data.plan import epoch_pieces, resampled_pieces, stable_seed
from unimlip_train.data.shards import ShardSource, iter_raw_samples
from unimlip_train.data.skips import SkipCounter

#: Marks the placeholder of a sample its shard's index promised but its tar did not yield.
MISSING = "__missing__"


def raw_samples(pieces: Iterator[tuple], handler: SkipCounter, n_shards: int) -> Iterator[dict]:
    """Raw samples of each piece, tagged with the piece's pass/draw: a sample read twice in one epoch
    (a source repeated by its weight, a shard resampled) gets different augmentation each time. A piece that
    ends early is followed by one ``MISSING`` placeholder per sample it lacked."""
    barren = 0
    for url, first, stop, draw in pieces:
        got = 0
        for sample in itertools.islice(iter_raw_samples(url, handler), first, stop):
            got += 1
            sample["__draw__"] = draw
            yield sample
        handler.short(url, stop - first - got)
        for position in range(first + got, stop):
            yield {"__key__": f"{MISSING}{position}", "__url__": url, "__draw__": draw, MISSING: True}
        barren = 0 if got else barren + 1
        if barren > 2 * n_shards:
            raise RuntimeError(f"no readable samples in {2 * n_shards} shards in a row (last: {url})")


def source_stream(src: ShardSource, sidx: int, lo: int, hi: int, *, seed: int, epoch: int, unit: int,
                  resampled: bool, bufsize: int, handler: SkipCounter) -> Iterator[dict]:
    """The unit's window [lo, hi) of one source, buffer-shuffled, then the samples after it (top-up)."""
    pieces = (resampled_pieces(src, seed, epoch, sidx, unit) if resampled
              else epoch_pieces(src, seed, epoch, sidx, lo))
    raw = raw_samples(pieces, handler, len(src.urls))
    window = itertools.islice(raw, hi - lo)
    if bufsize > 1:
        window = wds.shuffle(bufsize, initial=bufsize, seed=stable_seed(seed, "buffer", epoch, sidx, unit))(window)
    for sample in itertools.chain(window, raw):
        sample["__source__"] = sidx
        yield sample
