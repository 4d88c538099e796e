"""Skip accounting: every sample a stream loses is counted once, per shard, at one point of the pipeline.

A sample is lost when the decoder rejects it (a corrupt image, no report, a json member over its limits, an
image above ``data.max_image_pixels``) or when its shard ends before the count its ``index.json`` promised (a
truncated tar, a garbled tar header: ``raw.py`` stands a placeholder in for each missing sample). Both reach
the decoder (``decode.decoded``), which counts every sample it is handed as read and every lost one as skipped:
so at each batch a worker hands out, ``read == samples batched + skipped`` holds exactly, and the one counter
(``SkipStats``, carried in each batch's cursor) is what the log's running totals, the summary line, TensorBoard
and ``data.max_skip_fraction`` all read, cumulatively and exactly across resumes (a resumed stream replays the
raw samples it consumed before its checkpoint before the decoder sees anything).
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
    """A worker's running ``SkipStats``, over all its epochs, and the warnings that name each loss.

    The decoder counts (``read``, ``skip``, ``missing``); the raw stage only logs (``short``, and tar-level errors
    as a WebDataset handler: return True = continue, the samples they cost arrive as placeholders). While a
    resumed stream replays the raw samples it consumed before its checkpoint (``muted``), nothing is logged again.
    """

    def __init__(self, stats: SkipStats | None = None):
        self.stats = SkipStats.combine([stats] if stats else [])  # a copy: the caller's stays as it was
        self.muted = False

    def __call__(self, exn: BaseException) -> bool:
        if not self.muted:
            log.warning("corrupt tar data (%r): the samples it costs are counted when the shard ends short", exn)
        return True

    def read(self) -> None:
        """A sample handed to the decoder (used, or lost below)."""
        self.stats.read += 1

    def _lost(self, shard: str) -> None:
        self.stats.by_shard[shard] = self.stats.by_shard.get(shard, 0) + 1

    def skip(self, shard: str, key: str, exn: BaseException) -> None:
        """A sample read from ``shard`` that cannot be used."""
        self._lost(shard)
        log.warning("skipping corrupt sample %s of %s: %s: %s", key, shard, type(exn).__name__, exn)

    def missing(self, shard: str) -> None:
        """A sample ``shard``'s index promised that its tar did not yield (its shortfall was logged by ``short``)."""
        self._lost(shard)

    def short(self, shard: str, missing: int) -> None:
        """``missing`` samples the index promised that ``shard`` did not yield: logged once per read of it."""
        if not self.muted and missing > 0:
            log.warning("shard %s ended %d sample(s) short of its index count (truncated or corrupt tar): each is "
                        "counted as a skipped sample", shard, missing)

    def state(self) -> dict:
        return asdict(self.stats)


def global_skip_stats(stream: "TrainStream") -> SkipStats:
    """Collective (every rank, same call order): the skip statistics of all ranks combined, the same on each."""
    return SkipStats.combine(du.all_gather_object(stream.skip_stats()))
