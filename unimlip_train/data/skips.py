"""Skip accounting: corrupt samples are skipped, logged, and counted per shard with the samples read.

Corrupt samples or tar members are skipped, logged, and counted per shard together with the samples read
(``SkipCounter``, ``SkipStats``), cumulatively and exactly across resumes: a resumed stream replays the raw
samples it consumed before its checkpoint with the counter muted. ``data.max_skip_fraction`` bounds the
fraction skipped (``SkipStats.exceeded``), over all ranks (``global_skip_stats``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import unimlip_train.distributed.process_group as du

if TYPE_CHECKING:
    from unimlip_train.data.loader import TrainStream

log = logging.getLogger(__name__)


@dataclass
class SkipStats:
    """Corrupt samples skipped (per shard) and samples read by a stream: one worker's, one rank's
    (``TrainStream.skip_stats``), or all ranks' (``global_skip_stats``)."""

    by_shard: dict = field(default_factory=dict)
    read: int = 0

    #: the fraction check counts over at least this many samples, so a bad sample early on stops nothing
    MIN_READ = 1000

    @property
    def skipped(self) -> int:
        return sum(self.by_shard.values())

    def worst(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` shards with the most skipped samples, most first."""
        return sorted(self.by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    @classmethod
    def combine(cls, parts: list["SkipStats"]) -> "SkipStats":
        out = cls()
        for part in parts:
            out.read += part.read
            for shard, n in part.by_shard.items():
                out.by_shard[shard] = out.by_shard.get(shard, 0) + n
        return out

    def exceeded(self, max_fraction: float) -> str:
        """'' while at most ``max_fraction`` of the samples read (over at least MIN_READ) were skipped, else a
        message naming the worst shards (``data.max_skip_fraction``)."""
        if self.skipped <= max_fraction * max(self.read, self.MIN_READ):
            return ""
        worst = ", ".join(f"{shard} ({n})" for shard, n in self.worst())
        return (f"{self.skipped} of {self.read} samples read were corrupt and skipped "
                f"({100 * self.skipped / max(self.read, 1):.1f}%, more than data.max_skip_fraction={max_fraction}); "
                f"worst shards: {worst}. Check them with `unimlip-shard verify`, re-shard the data, or raise "
                "data.max_skip_fraction")


class SkipCounter:
    """A worker's running ``SkipStats``, over all its epochs.

    Each lost sample is counted once: a sample the decoder rejects (``skip``), or a sample a shard failed to
    yield (``short``: a truncated tar or a corrupt member left the shard short of its index count). As a
    WebDataset handler (return True = continue) it only logs tar-level errors, whose samples the shortfall
    counts. While a resumed stream replays the raw samples it consumed before its checkpoint (``muted``),
    nothing is counted or logged again, so the totals continue exactly.
    """

    def __init__(self, stats: SkipStats | None = None):
        self.stats = SkipStats.combine([stats] if stats else [])  # a copy: the caller's stays as it was
        self.muted = False

    def __call__(self, exn: BaseException) -> bool:
        if not self.muted:
            log.warning("skipping corrupt tar member: %r", exn)
        return True

    def pulled(self) -> None:
        if not self.muted:
            self.stats.read += 1

    def skip(self, shard: str, exn: BaseException) -> None:
        """A sample read from ``shard`` that cannot be used."""
        if not self.muted:
            self.stats.by_shard[shard] = self.stats.by_shard.get(shard, 0) + 1
            log.warning("skipping corrupt sample (%d so far in this worker): %r", self.stats.skipped, exn)

    def short(self, shard: str, missing: int) -> None:
        """``missing`` samples the index promised that ``shard`` did not yield."""
        if not self.muted and missing > 0:
            self.stats.by_shard[shard] = self.stats.by_shard.get(shard, 0) + missing
            self.stats.read += missing
            log.warning("shard %s ended %d sample(s) short of its index count (truncated or corrupt)", shard, missing)

    def state(self) -> dict:
        return asdict(self.stats)


def global_skip_stats(stream: "TrainStream") -> SkipStats:
    """Collective (every rank, same call order): the skip statistics of all ranks combined, the same on each."""
    return SkipStats.combine(du.all_gather_object(stream.skip_stats()))
