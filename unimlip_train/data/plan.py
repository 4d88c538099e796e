"""The epoch plan: which samples each unit (one worker of one rank) reads, and in what order. No I/O.

Why every rank yields exactly ``steps_per_epoch`` batches, and what is dropped:
  * Each source's shards are shuffled with (seed, epoch, source): the same order on every rank. Their
    samples form one sequence per source and epoch; an epoch takes ``quota`` samples from it
    (``data.samples_per_epoch`` split by source weight, default: every sample once). A quota larger
    than the source continues into further reshuffled passes.
  * That span is cut into ``world_size * workers`` contiguous windows, rank-major (split by node, then
    by worker). A worker reads only the shards its window overlaps (at most one partial shard at each
    end, skipped without decoding), shuffles it with a buffer seeded by (seed, epoch, unit), and the
    sources are interleaved by a seeded permutation with exact per-source counts (a deterministic
    ``RandomMix``). ``data.resampled`` draws shards with replacement instead (unbounded streaming).
  * Every worker then takes the same number of samples, the per-worker count rounded down to whole
    micro-batches. Fewer than ``world * workers * micro_batch`` samples per epoch are dropped, and they
    rotate across epochs because the shard order is reshuffled. A worker that comes up short because
    samples were corrupt tops up from the samples that follow its window, so no rank ever runs dry.

A piece is ``(url, first, stop, pass)``: samples ``first`` to ``stop`` of one shard, read in the given pass
(or resampling draw), optionally with a fifth element, the sample ranges of the shard wanted (a unit whose share
of an epoch has holes: ``range_pieces``, ``remainder.py``). ``raw.py`` reads the pieces; ``loader.py`` mixes the
sources and cuts the batches. Evaluation cuts the unshuffled sequence into the same windows (``window_pieces``).
"""
from __future__ import annotations

import hashlib
import itertools
import random
from typing import Any, Iterator

from unimlip_train.data.shards import ShardSource


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def source_quotas(sources: list[ShardSource], samples_per_epoch: int) -> tuple[int, list[int]]:
    """(samples per epoch, each source's quota of them): ``samples_per_epoch`` (0: every sample once) split by
    source weight."""
    total = sum(s.total for s in sources)
    per_epoch = samples_per_epoch or total
    weight_sum = sum(s.weight for s in sources)
    return per_epoch, [round(per_epoch * s.weight / weight_sum) for s in sources]


def windows(total: int, units: int, unit: int) -> tuple:
    """[lo, hi) of ``unit``'s contiguous window when ``total`` samples are cut into ``units`` windows."""
    return unit * total // units, (unit + 1) * total // units


def _pass_order(src: ShardSource, seed: int, epoch: int, sidx: int, pass_no: int) -> list:
    order = list(range(len(src.urls)))
    random.Random(stable_seed(seed, "shards", epoch, sidx, pass_no)).shuffle(order)
    return order


def epoch_pieces(src: ShardSource, seed: int, epoch: int, sidx: int, start: int) -> Iterator[tuple]:
    """(url, first, stop, pass) sample ranges of the epoch's sequence from position ``start`` on (unbounded)."""
    pos = 0
    for pass_no in itertools.count():
        for i in _pass_order(src, seed, epoch, sidx, pass_no):
            n = src.counts[i]
            if pos + n > start:
                yield src.urls[i], max(0, start - pos), n, pass_no
            pos += n


def range_pieces(src: ShardSource, seed: int, epoch: int, sidx: int, ranges: tuple) -> Iterator[tuple]:
    """(url, first, stop, pass, wanted) pieces of the epoch sequence's positions in ``ranges`` (sorted, disjoint
    ``(start, stop)`` pairs), one per shard they touch (``wanted``: that shard's sample ranges), then the sequence
    from the end of the last range on, unbounded (the top-up). ``[(lo, hi)]`` reads what ``epoch_pieces`` does."""
    todo = [(a, b) for a, b in ranges if b > a]
    k, pos = 0, 0
    for pass_no in itertools.count():
        if k == len(todo):
            break
        for i in _pass_order(src, seed, epoch, sidx, pass_no):
            n, wanted = src.counts[i], []
            while k < len(todo) and todo[k][0] < pos + n:
                a, b = todo[k]
                wanted.append((max(a, pos) - pos, min(b, pos + n) - pos))
                if b > pos + n:
                    break  # the range goes on in the next shard
                k += 1
            if wanted:
                yield src.urls[i], wanted[0][0], wanted[-1][1], pass_no, tuple(wanted)
            pos += n
            if k == len(todo):
                break
    yield from epoch_pieces(src, seed, epoch, sidx, ranges[-1][1])


def resampled_pieces(src: ShardSource, seed: int, epoch: int, sidx: int, unit: int) -> Iterator[tuple]:
    """Whole shards drawn with replacement (weighted by size, so every sample is equally likely)."""
    rng = random.Random(stable_seed(seed, "resample", epoch, sidx, unit))
    for draw in itertools.count():
        i = rng.choices(range(len(src.urls)), weights=src.counts)[0]
        yield src.urls[i], 0, src.counts[i], (unit, draw)


def window_pieces(src: ShardSource, lo: int, hi: int) -> list[tuple]:
    """The pieces of samples [lo, hi) of the source's unshuffled sequence (shards in listed order), evaluation's."""
    pieces, pos = [], 0
    for url, n in zip(src.urls, src.counts):
        if pos < hi and pos + n > lo:
            pieces.append((url, max(0, lo - pos), min(n, hi - pos), 0))
        pos += n
    return pieces
