"""The training stream: WebDataset shards to training batches, exact per rank, resumable mid-epoch.

A pipeline of small stages, one module each, in the order a sample passes them:
  plan.py         the epoch plan: shard order, quotas, each unit's window (why every rank gets the same steps)
  raw.py          the planned pieces read from their shards (undecoded), buffer-shuffled, topped up
  remainder.py    the rest of an interrupted epoch recut for another number of units (ranks x workers)
  skips.py        corrupt samples skipped, logged and counted per shard, exactly across resumes
  decode.py       safe decoding (image, txt and json members only) and the choice of a study's views
  augment.py      the views: data.augment's albumentations list (medical_transforms.py: the project's own)
  collate.py      samples to the batch dict: tokenization, MLM masking, identity ids
  loader.py       this module: the sources mixed, samples augmented and batched, the resumable state
  eval_loader.py  evaluation: every sample exactly once across ranks, unshuffled

Augmentation randomness is seeded per sample from (seed, epoch, source, key), so a resumed stream, which
skips consumed raw samples before decoding, reproduces the uninterrupted one tensor for tensor.

Resuming with another micro batch size continues exactly (the position is counted in samples); another
shuffle buffer applies from the next epoch (the current one finishes in its saved order); another number of
workers or ranks delivers the samples of the interrupted epoch no unit consumed, exactly once, cut into the new
units' shares (``remainder.py``; ``resume``), then follows the plan for the new layout; another data plan or an
older state format restarts at the beginning of the next epoch, with a message.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimlip_train.config.schema import Config
from unimlip_train.data.augment import TrainAugment
from unimlip_train.data.collate import BatchNeeds, Collate, collated_batches
from unimlip_train.data.decode import choose_views, decoded
from unimlip_train.data.plan import source_quotas, stable_seed
from unimlip_train.data.raw import source_stream
from unimlip_train.data.remainder import PlanFacts, StreamView, UnitSpec, fresh_spec, mix_order
from unimlip_train.data.shards import resolve_sources
from unimlip_train.data.skips import SkipCounter, SkipStats
from unimlip_train.data.text import augment_report, model_text
from unimlip_train.data.worker_start import worker_options

log = logging.getLogger(__name__)

_STATE_VERSION = 3


def _after_replay(raws: Iterator[dict], consumed: int, handler: SkipCounter) -> Iterator[dict]:
    """``raws`` after its first ``consumed`` items, which are pulled (undecoded) with the counter muted: they
    were counted before the checkpoint this stream resumes from."""
    handler.muted = True
    try:
        for _ in itertools.islice(raws, consumed):
            pass
    finally:
        handler.muted = False
    yield from raws


class _TrainUnits(IterableDataset):
    """What one DataLoader worker runs: its logical unit's batches, epoch after epoch, from its cursor."""

    def __init__(self, cfg: Config, tokenizer, needs: BatchNeeds, sources: list, plan: PlanFacts, rank: int,
                 workers: int, world_size: int, recut_specs: dict, cursors: list, first_worker: int):
        super().__init__()
        self.cfg, self.needs, self.sources, self.plan = cfg, needs, sources, plan
        self.rank, self.workers, self.world_size = rank, workers, world_size
        self.recut_specs, self.cursors, self.first_worker = recut_specs, cursors, first_worker
        self.collate = Collate(cfg, tokenizer, needs)
        self.augment = TrainAugment(cfg.data)
        self.mask_token = tokenizer.mask_token or "[MASK]"

    def _spec(self, epoch: int, worker: int) -> UnitSpec:
        """The unit's epoch: its share of a recut epoch, else the plan's window."""
        if epoch in self.recut_specs:
            return self.recut_specs[epoch][worker]
        return fresh_spec(self.plan, self.world_size * self.workers, self.rank * self.workers + worker)

    def _mixed(self, epoch: int, spec: UnitSpec, bufsize: int, handler: SkipCounter) -> Iterator[dict]:
        """Deterministic weighted mix of the sources (``remainder.mix_order``) of one unit's epoch."""
        streams = [source_stream(src, sidx, spec.ranges[sidx], seed=self.cfg.seed, epoch=epoch, unit=spec.unit,
                                 resampled=self.cfg.data.resampled, bufsize=bufsize, handler=handler)
                   for sidx, src in enumerate(self.sources)]
        for sidx in mix_order(spec, self.plan, epoch):
            yield next(streams[sidx])

    def _pick(self, epoch: int):
        """The training view choice for ``decode_sample``, seeded per sample and epoch (exact on resume)."""
        def pick(raw: dict, positions: list) -> list:
            origin = (raw.get("__source__"), raw.get("__draw__"))
            rng = random.Random(stable_seed(self.cfg.seed, "view", epoch, origin, raw["__key__"]))
            return choose_views(positions, self.cfg.data.view, self.needs.image_view2, rng)
        return pick

    def _prepare(self, sample: dict, epoch: int) -> dict:
        d, seed = self.cfg.data, stable_seed(self.cfg.seed, "sample", epoch, sample["origin"], sample["key"])
        rng, py_rng = np.random.default_rng(seed), random.Random(seed)
        images = sample.pop("images")
        sample["view1"] = self.augment(images[0], rng)
        if self.needs.image_view2:  # a second image of the study with data.view=pair, else the same one
            sample["view2"] = self.augment(images[-1], rng)
        sample["text"] = model_text(sample["text"], d.text.sections, d.text.order, random.Random(seed ^ 0x5EC7))
        if self.needs.text_view2:
            sample["text2"] = augment_report(sample["text"], py_rng, d.text.sentence_shuffle_p,
                                             d.text.sentence_drop_p, d.text.span_mask_p, self.mask_token)
        if self.needs.mlm:
            sample["mlm_draws"] = rng.random((3, d.text.max_length), dtype=np.float32)
        return sample

    def _epoch(self, worker: int, cursor: dict, spec: UnitSpec, handler: SkipCounter) -> Iterator[dict]:
        """Batches of one epoch of one unit, starting after ``cursor`` (consumed raw samples skipped undecoded,
        and not counted again). An epoch takes ``spec.budget`` samples; a cursor saved with another micro batch
        size may leave fewer than one batch at the end, dropped like the epoch's remainder always is."""
        epoch, mb = cursor["epoch"], self.cfg.train.micro_batch_size
        counter = {"raw": cursor["raw"]}
        left = (spec.budget(mb) - cursor["taken"]) // mb * mb
        pipeline = wds.DataPipeline(
            lambda: self._mixed(epoch, spec, cursor["bufsize"], handler),
            lambda raws: _after_replay(raws, cursor["raw"], handler),
            lambda raws: decoded(raws, handler, self.cfg.data, counter, self._pick(epoch)),
            lambda samples: itertools.islice(samples, left),
            lambda samples: (self._prepare(s, epoch) for s in samples),
            lambda samples: collated_batches(samples, mb, self.collate.train, partial=False),
        )
        for done, batch in enumerate(pipeline, start=1):
            batch["_cursor"] = {"worker": worker, "epoch": epoch, "raw": counter["raw"],
                                "taken": cursor["taken"] + done * mb, "bufsize": cursor["bufsize"],
                                "skips": handler.state()}
            yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = (self.first_worker + (info.id if info else 0)) % self.workers
        cursor = dict(self.cursors[worker])
        handler = SkipCounter(SkipStats(**cursor["skips"]))
        mb = self.cfg.train.micro_batch_size
        while True:  # the unit's stream never runs dry (top-up), so each epoch gives exactly its batches
            spec = self._spec(cursor["epoch"], worker)
            if spec.budget(mb) - cursor["taken"] >= mb:  # else: saved after its epoch's last batch
                yield from self._epoch(worker, cursor, spec, handler)
            cursor = {"epoch": cursor["epoch"] + 1, "raw": 0, "taken": 0, "bufsize": self.cfg.data.shuffle_buffer}


class TrainStream:
    """Endless training batches for one rank; ``steps_per_epoch`` is identical on every rank.

    ``state_dict()`` describes the position after the last batch handed out; ``load_state_dict`` (one rank's
    state, same layout) or ``resume`` (any layout) before iterating resumes exactly there (same samples, same
    augmentation), or, at another number of ranks or workers, with the rest of the interrupted epoch recut.
    """

    def __init__(self, cfg: Config, tokenizer, needs: BatchNeeds, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.cfg, self.tokenizer, self.needs = cfg, tokenizer, needs
        self.rank, self.world_size = rank, world_size
        self.num_workers = cfg.data.num_workers
        self.workers = max(1, cfg.data.num_workers)
        self.micro_batch_size = cfg.train.micro_batch_size
        self.sources = resolve_sources(cfg.data.train, "train")
        per_epoch, self.quotas = source_quotas(self.sources, cfg.data.samples_per_epoch)
        self.plan = PlanFacts(tuple(self.quotas), tuple(s.weight for s in self.sources), cfg.seed, cfg.data.resampled)
        units = world_size * self.workers
        per_unit = sum(q // units for q in self.quotas)
        self.batches_per_unit = per_unit // self.micro_batch_size
        if self.batches_per_unit < 1:
            raise ValueError(f"{per_epoch} samples per epoch are too few for {world_size} ranks x {self.workers} "
                             f"workers x micro batch {self.micro_batch_size}: lower data.num_workers or the batch")
        self.steps_per_epoch = self.batches_per_unit * self.workers
        self.samples_per_epoch = self.steps_per_epoch * self.micro_batch_size * world_size
        if rank == 0:
            log.info("train stream: %d sources, %d samples/epoch used of %d planned (%d dropped, rotating), "
                     "%d steps/epoch per rank", len(self.sources), self.samples_per_epoch, per_epoch,
                     per_epoch - self.samples_per_epoch, self.steps_per_epoch)
        # What saved raw positions refer to; shard names, not paths, so a data set moved elsewhere still resumes.
        # The shuffle buffer is not part of it: each cursor carries the buffer its epoch was started with.
        shard_lists = [([u.rsplit("/", 1)[-1] for u in s.urls], s.counts, s.weight) for s in self.sources]
        self._plan = stable_seed(shard_lists, self.quotas, cfg.data.resampled)
        self._delivered = 0
        self._cursors = [self._fresh_cursor(0, SkipCounter()) for _ in range(self.workers)]
        self._recuts: dict[int, StreamView] = {}  # epoch -> the view whose remainder this layout recut
        self._pending = None  # the view loaded at another layout, kept as the state until a batch is drawn
        #: after a recut: {"epoch", "remaining", "from": (ranks, workers), "to": (ranks, workers)}
        self.resharded = None
        self.last_epoch = None  # the epoch of the last batch handed out

    def _fresh_cursor(self, epoch: int, skips: SkipCounter) -> dict:
        return {"epoch": epoch, "raw": 0, "taken": 0, "bufsize": self.cfg.data.shuffle_buffer, "skips": skips.state()}

    def _spec(self, epoch: int, worker: int) -> UnitSpec:
        """This rank's unit ``worker`` in ``epoch``: its share of a recut epoch, else the plan's window."""
        unit, units = self.rank * self.workers + worker, self.world_size * self.workers
        parent = self._recuts.get(epoch)
        return parent.share(epoch, units, unit) if parent else fresh_spec(self.plan, units, unit)

    @property
    def skipped_samples(self) -> int:
        """Corrupt samples this rank skipped so far (``skip_stats().skipped``)."""
        return self.skip_stats().skipped

    def skip_stats(self) -> SkipStats:
        """Corrupt samples this rank skipped (per shard) and samples it read, cumulative over epochs and
        resumes, as of the last batch handed out (``global_skip_stats`` combines all ranks)."""
        return SkipStats.combine([SkipStats(**c["skips"]) for c in self._cursors])

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        worker = self._delivered % self.workers
        c, mb = self._cursors[worker], self.micro_batch_size
        done = self._spec(c["epoch"], worker).budget(mb) - c["taken"] < mb
        return c["epoch"] + 1 if done else c["epoch"]

    def state_dict(self) -> dict:
        if self._pending is not None:  # nothing drawn at this layout yet: the old layout, as it was
            return {"version": _STATE_VERSION, "view": self._pending}
        oldest = min(c["epoch"] for c in self._cursors)
        return {"version": _STATE_VERSION, "delivered": self._delivered,
                "cursors": [json.loads(json.dumps(c)) for c in self._cursors], **self._layout(),
                "recuts": {str(e): v.data for e, v in self._recuts.items() if e >= oldest}}

    def _layout(self) -> dict:
        return {"rank": self.rank, "workers": self.workers, "world_size": self.world_size, "seed": self.cfg.seed,
                "micro_batch_size": self.micro_batch_size, "steps_per_epoch": self.steps_per_epoch,
                "plan": self._plan}

    def resume(self, read_state: Callable[[int], dict], saved_world: int) -> None:
        """Resume from a checkpoint written by ``saved_world`` ranks; ``read_state(r)`` gives rank r's
        ``state_dict()``. The same ranks and workers: this rank's state, exactly (``load_state_dict``). Another
        number of either: the rest of the interrupted epoch, recut for this layout (``load_view``); the other
        ranks' states are read only then."""
        own = read_state(self.rank) if self.rank < saved_world else read_state(0)
        if own.get("version") != _STATE_VERSION:
            self.load_state_dict(own, strict=False)  # an older format: the next epoch, with a message
        elif "view" in own:
            self.load_view(own["view"])
        elif own["world_size"] == self.world_size and own["workers"] == self.workers:
            self.load_state_dict(own)
        else:
            self.load_view(StreamView.build([own if r == self.rank else read_state(r) for r in range(saved_world)]))

    def load_view(self, view: dict) -> None:
        """Resume from every unit of a stream (``StreamView.build``): exactly, at its own layout; at another, with
        the interrupted epoch's remainder recut for this one (``remainder.py``), its skip counts carried (summed,
        on this layout's first unit)."""
        layout = view["layout"]
        if layout["world_size"] == self.world_size and layout["workers"] == self.workers:
            k = self.rank * self.workers
            self.load_state_dict({"version": _STATE_VERSION, "delivered": view["delivered"][self.rank],
                                  "cursors": view["units"][k:k + self.workers], **layout, "rank": self.rank,
                                  "recuts": view.get("recuts", {})})
            return
        parent = StreamView(view, self.plan)
        skips = SkipStats.combine([SkipStats(**s) for s in parent.skips()])
        diff = {k: (layout[k], v) for k, v in self._layout().items() if k in ("seed", "plan") and layout[k] != v}
        if diff:
            return self._restart(diff, view["units"], skips if self.rank == 0 else SkipStats())
        start, epochs = parent.interrupted()
        self._recuts = {e: parent for e in epochs}
        self._cursors = [self._fresh_cursor(start, SkipCounter(skips if self.rank == 0 and w == 0 else None))
                         for w in range(self.workers)]
        self._delivered, self._pending = 0, view
        epoch = epochs[0] if epochs else max(start - 1, 0)
        self.resharded = {"epoch": epoch, "remaining": parent.remaining(epoch) if epochs else 0,
                          "from": (layout["world_size"], layout["workers"]), "to": (self.world_size, self.workers)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state`` (a ``state_dict()`` from a checkpoint), before iterating.

        * The same layout, or another micro batch size (positions count samples): exactly where it stopped.
          Another shuffle buffer: the current epoch finishes in its saved order; the new one applies from the
          next epoch.
        * A pending state (a view of another layout, saved before any batch was drawn): as ``load_view``.
        * Another seed or data plan (sources, weights, epoch size), an older loader version, or (``strict=False``)
          another rank / number of workers or ranks: positions inside an epoch do not map, so the stream
          restarts at the beginning of the next epoch, with a message (``resume`` recuts instead).
        ``strict`` refuses (ValueError) a state saved by another rank or world size: that happens only when the
        caller passes one knowingly (with ``strict=False``)."""
        if "view" in state and state.get("version") == _STATE_VERSION:
            return self.load_view(state["view"])
        now = self._layout()
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if strict and ("rank" in diff or "world_size" in diff):
            raise ValueError(f"loader state of rank {state.get('rank')} of {state.get('world_size')} ranks given "
                             f"to rank {self.rank} of {self.world_size}")
        if state.get("version") == _STATE_VERSION and set(diff) <= {"micro_batch_size", "steps_per_epoch"}:
            self._delivered = int(state["delivered"])
            self._cursors = [json.loads(json.dumps(c)) for c in state["cursors"]]
            self._recuts = {int(e): StreamView(v, self.plan) for e, v in state.get("recuts", {}).items()}
            if "micro_batch_size" in diff:
                self._note("micro batch %d -> %d: the data stream continues exactly where it stopped",
                           *diff["micro_batch_size"])
            old = {c["bufsize"] for c in self._cursors} - {self.cfg.data.shuffle_buffer}
            if old:
                self._note("shuffle buffer %s -> %d: the current epoch finishes in its saved order, the new buffer "
                           "applies from epoch %d", "/".join(map(str, sorted(old))), self.cfg.data.shuffle_buffer,
                           max(c["epoch"] for c in self._cursors) + 1)
            return
        if state.get("version") != _STATE_VERSION:
            diff["loader state version"] = (state.get("version"), _STATE_VERSION)
        own = state.get("rank") == self.rank  # another rank's counts stay with that rank
        cursors = state.get("cursors", [])
        self._restart(diff, cursors, SkipStats.combine([SkipStats(**c["skips"]) for c in cursors
                                                        if own and "skips" in c]))

    def _restart(self, diff: dict, cursors: list, carried: SkipStats) -> None:
        """Start at the beginning of the epoch after the saved positions, with a message naming ``diff``."""
        next_epoch = max((c["epoch"] + (1 if c.get("raw", 0) else 0) for c in cursors), default=0)
        self._delivered = next_epoch * self.steps_per_epoch
        self._cursors = [self._fresh_cursor(next_epoch, SkipCounter(carried if i == 0 else None))
                         for i in range(self.workers)]
        self._note("data stream: %s: positions inside an epoch do not carry over, so it restarts at the beginning "
                   "of epoch %d", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()), next_epoch)

    def _note(self, message: str, *args) -> None:
        if self.rank == 0:
            log.warning(message, *args)

    def __iter__(self) -> Iterator[dict]:
        recut_specs = {e: [self._spec(e, w) for w in range(self.workers)] for e in self._recuts}
        dataset = _TrainUnits(self.cfg, self.tokenizer, self.needs, self.sources, self.plan, self.rank,
                              self.workers, self.world_size, recut_specs, self._cursors,
                              first_worker=self._delivered % self.workers)
        if self.num_workers > 0:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=torch.cuda.is_available(),  # async host-to-GPU copies
                                      **worker_options(self.cfg.data.worker_start)))
        else:
            batches = iter(dataset)
        for batch in batches:
            cursor = batch.pop("_cursor")
            self._cursors[cursor.pop("worker")] = cursor
            self._delivered += 1
            self._pending, self.last_epoch = None, cursor["epoch"]
            yield batch
