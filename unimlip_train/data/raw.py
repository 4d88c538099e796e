"""Raw (undecoded) samples: the pieces the epoch plan names, read from their shards.

A unit's share of one source (its window, or a recut share with holes: ``remainder.py``) is buffer-shuffled
(seeded by (seed, epoch, source, unit)), then continued by the samples after it: the top-up that keeps a worker
whose samples were corrupt from running dry. Each sample is tagged with its source and its pass / resampling
draw, which seed its view choice and augmentation. Nothing is decoded here, so a resumed stream skips what it
consumed at the cost of reading the bytes only.

The stream yields exactly one item per planned position: a position its shard lacks (a truncated or garbled
tar, a shard short of its index count) comes out as a placeholder (``MISSING``), which travels like a sample and
is counted as skipped where every other loss is counted, by the decoder (``skips.py``). So which positions a unit
consumed follows from its raw count alone, without reading (``remainder.py``).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import webdataset as wds

from unimlip_train.data.plan import range_pieces, resampled_pieces, stable_seed
from unimlip_train.data.shards import ShardSource, iter_raw_samples
from unimlip_train.data.skips import SkipCounter

#: key of the placeholder for a planned sample its shard did not yield
MISSING = "__missing__"


def raw_samples(pieces: Iterator[tuple], handler: SkipCounter, n_shards: int) -> Iterator[dict]:
    """Raw samples of each piece, tagged with the piece's pass/draw: a sample read twice in one epoch
    (a source repeated by its weight, a shard resampled) gets different augmentation each time. A piece that
    ends early is followed by one ``MISSING`` placeholder per sample it lacked."""
    barren = 0
    for piece in pieces:
        url, first, stop, draw = piece[:4]
        wanted = piece[4] if len(piece) > 4 else ((first, stop),)
        samples = itertools.islice(iter_raw_samples(url, handler), first, stop)
        got, pos = 0, first  # pos: the shard index of the sample ``samples`` yields next
        for index in (i for a, b in wanted for i in range(a, b)):
            sample = None
            while pos <= index and (sample := next(samples, None)) is not None:
                pos += 1
            if sample is None:  # the shard ended early: say once what it lacked
                handler.short(url, sum(b - max(a, index) for a, b in wanted if b > index))
                yield from _placeholders(url, draw, wanted, index)
                break
            got += 1
            sample["__draw__"] = draw
            yield sample
        barren = 0 if got else barren + 1
        if barren > 2 * n_shards:
            raise RuntimeError(f"no readable samples in {2 * n_shards} shards in a row (last: {url})")


def _placeholders(url: str, draw, wanted: tuple, index: int) -> Iterator[dict]:
    for a, b in wanted:
        for i in range(max(a, index), b):
            yield {"__key__": f"{MISSING}{i}", "__url__": url, "__draw__": draw, MISSING: True}


def shuffled(items: Iterator, bufsize: int, seed: int) -> Iterator:
    """``items`` through the seeded shuffle buffer (which picks by position only, never by content)."""
    return wds.shuffle(bufsize, initial=bufsize, seed=seed)(items) if bufsize > 1 else items


def buffer_seed(seed: int, epoch: int, sidx: int, unit) -> int:
    return stable_seed(seed, "buffer", epoch, sidx, unit)


def source_stream(src: ShardSource, sidx: int, ranges: tuple, *, seed: int, epoch: int, unit, resampled: bool,
                  bufsize: int, handler: SkipCounter) -> Iterator[dict]:
    """The unit's ``ranges`` of one source's epoch sequence (``range_pieces``; resampled: that many drawn samples),
    buffer-shuffled, then the samples after them (top-up)."""
    pieces = (resampled_pieces(src, seed, epoch, sidx, unit) if resampled
              else range_pieces(src, seed, epoch, sidx, ranges))
    raw = raw_samples(pieces, handler, len(src.urls))
    window = shuffled(itertools.islice(raw, sum(b - a for a, b in ranges)), bufsize, buffer_seed(seed, epoch, sidx, unit))
    for sample in itertools.chain(window, raw):
        sample["__source__"] = sidx
        yield sample
