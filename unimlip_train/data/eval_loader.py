"""The evaluation loader: every sample of a source exactly once across ranks, unshuffled, in fixed batches.

Each unit (one worker of one rank) reads its contiguous window of each source's samples in listed order
(the epoch plan's windows, without shuffling, quotas or top-up), decodes the first frontal image of a study
(else the first) with the deterministic transform, and ends with a partial batch. With ``keys``, only those
samples are decoded: the others are dropped while still raw.
"""
from __future__ import annotations

from typing import Any, Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimlip_train.config.schema import Config
from unimlip_train.data.collate import BatchNeeds, Collate, collated_batches
from unimlip_train.data.decode import decoded, eval_view
from unimlip_train.data.plan import window_pieces, windows
from unimlip_train.data.raw import raw_samples
from unimlip_train.data.shards import resolve_sources
from unimlip_train.data.skips import SkipCounter
from unimlip_train.data.text import model_text
from unimlip_train.data.transforms import EvalTransform
from unimlip_train.data.worker_start import worker_options


class _EvalUnits(IterableDataset):
    """One unit's contiguous share of the unshuffled samples, deterministic transform, partial last batch."""

    def __init__(self, cfg: Config, tokenizer, sources: list, rank: int, world_size: int, workers: int,
                 batch_size: int, keys: frozenset | None = None):
        super().__init__()
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.workers, self.batch_size, self.keys = workers, batch_size, keys
        self.collate = Collate(cfg, tokenizer, BatchNeeds())
        self.transform = EvalTransform(cfg.data)

    def _prepare(self, sample: dict) -> dict:
        sample["view1"] = self.transform(sample.pop("images")[0])
        sample["text"] = model_text(sample["text"], self.cfg.data.text.sections, self.cfg.data.text.order)
        return sample

    def _raws(self, unit: int, handler: SkipCounter) -> Iterator[dict]:
        units = self.world_size * self.workers
        for src in self.sources:
            pieces = window_pieces(src, *windows(src.total, units, unit))
            yield from raw_samples(iter(pieces), handler, len(pieces) + 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        unit = self.rank * self.workers + (info.id if info else 0)
        handler = SkipCounter()
        pipeline = wds.DataPipeline(
            lambda: self._raws(unit, handler),
            lambda raws: (r for r in raws if self.keys is None or r["__key__"] in self.keys),  # before decoding
            lambda raws: decoded(raws, handler, self.cfg.data, {"raw": 0}, lambda _, v: eval_view(v)),
            lambda samples: (self._prepare(s) for s in samples),
            lambda samples: collated_batches(samples, self.batch_size, self.collate.eval, partial=True),
        )
        yield from pipeline


def build_eval_loader(cfg: Config, source: Any, tokenizer, batch_size: int, rank: int, world_size: int,
                      split: str = "val", keys: frozenset | None = None) -> Any:
    """Eval batches of ``source`` (pattern / dir / index.json / list): every sample exactly once across ranks;
    with ``keys``, only those samples (the others are skipped undecoded)."""
    sources = resolve_sources(source, split)
    workers = max(1, cfg.data.num_workers)
    dataset = _EvalUnits(cfg, tokenizer, sources, rank, world_size, workers, batch_size, keys)
    if cfg.data.num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                      **worker_options(cfg.data.worker_start))
