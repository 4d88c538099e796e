"""The streaming loader: WebDataset shards to training batches, exact per rank, resumable mid-epoch.

Epoch plan (why every rank yields exactly ``steps_per_epoch`` batches, and what is dropped):
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
Decoding reads only image (jpg/png, 8/16-bit), txt and json members: other members (``.pickle``,
``.pyd``...) are never read, so untrusted shards cannot run code. A study sample (json ``views``: several
images of one study) decodes only the images ``data.view`` picks, seeded by (seed, epoch, source, key):
``random`` one of them, ``frontal`` one of its PA/AP images (any when it has none), ``pair`` one for ``image``
and a different one of the same study for ``image_view2`` (when the image SSL term is on; the augmented copy of
the same image when the study has one image). Evaluation reads the first frontal image (else the first).
Corrupt samples or tar members are skipped, logged, and counted per shard together with the samples read
(``SkipCounter``, ``SkipStats``), cumulatively and exactly across resumes. Augmentation randomness is seeded
per sample from
(seed, epoch, source, key), so a resumed stream, which skips consumed raw samples before decoding,
reproduces the uninterrupted one tensor for tensor.

Resuming with another micro batch size continues exactly (the position is counted in samples); another
shuffle buffer applies from the next epoch (the current one finishes in its saved order); another number of
workers, ranks or another data plan restarts at the beginning of the next epoch, with a message.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimlip_train.config import Config, LossConfig
from unimlip_train.data.shards import ShardSource, iter_raw_samples, resolve_sources
from unimlip_train.data.text import augment_report, model_text
from unimlip_train.data.transforms import EvalTransform, TrainAugment, decode_image, normalisation, to_tensor
from unimlip_train.format.report_text import report_id
from unimlip_train.format.rows import is_frontal

log = logging.getLogger(__name__)

_IMAGE_EXTS = ("jpg", "jpeg", "png")
_STATE_VERSION = 2


@dataclass(frozen=True)
class BatchNeeds:
    """Which optional batch entries the enabled loss terms read."""

    image_view2: bool = False
    text_view2: bool = False
    mlm: bool = False


def batch_needs(loss_cfg: LossConfig) -> BatchNeeds:
    """A term is on iff its weight is non-zero."""
    return BatchNeeds(image_view2=loss_cfg.image_ssl.weight != 0, text_view2=loss_cfg.text_ssl.weight != 0,
                      mlm=loss_cfg.mlm.weight != 0)


def _seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def group_id(sample: dict) -> int:
    """A 63-bit id of the sample's group (patient / study, the shard json's ``group``; its key without one)."""
    group = str(sample["meta"].get("group") or sample["key"])
    return _seed("group", group) >> 1


# ---------------------------------------------------------------------------------------------------
# Raw (undecoded) sample streams
# ---------------------------------------------------------------------------------------------------


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
    from unimlip_train import distributed as du

    return SkipStats.combine(du.all_gather_object(stream.skip_stats()))


def _pass_order(src: ShardSource, seed: int, epoch: int, sidx: int, pass_no: int) -> list:
    order = list(range(len(src.urls)))
    random.Random(_seed(seed, "shards", epoch, sidx, pass_no)).shuffle(order)
    return order


def _pieces(src: ShardSource, seed: int, epoch: int, sidx: int, start: int) -> Iterator[tuple]:
    """(url, first, stop, pass) sample ranges of the epoch's sequence from position ``start`` on (unbounded)."""
    pos = 0
    for pass_no in itertools.count():
        for i in _pass_order(src, seed, epoch, sidx, pass_no):
            n = src.counts[i]
            if pos + n > start:
                yield src.urls[i], max(0, start - pos), n, pass_no
            pos += n


def _resampled_pieces(src: ShardSource, seed: int, epoch: int, sidx: int, unit: int) -> Iterator[tuple]:
    """Whole shards drawn with replacement (weighted by size, so every sample is equally likely)."""
    rng = random.Random(_seed(seed, "resample", epoch, sidx, unit))
    for draw in itertools.count():
        i = rng.choices(range(len(src.urls)), weights=src.counts)[0]
        yield src.urls[i], 0, src.counts[i], (unit, draw)


def _raw_samples(pieces: Iterator[tuple], handler: SkipCounter, n_shards: int) -> Iterator[dict]:
    """Raw samples of each piece, tagged with the piece's pass/draw: a sample read twice in one epoch
    (a source repeated by its weight, a shard resampled) gets different augmentation each time. A piece that
    ends early is counted short by what it lacked."""
    barren = 0
    for url, first, stop, draw in pieces:
        got = 0
        for sample in itertools.islice(iter_raw_samples(url, handler), first, stop):
            got += 1
            handler.pulled()
            sample["__draw__"] = draw
            yield sample
        handler.short(url, stop - first - got)
        barren = 0 if got else barren + 1
        if barren > 2 * n_shards:
            raise RuntimeError(f"no readable samples in {2 * n_shards} shards in a row (last: {url})")


def _source_stream(src: ShardSource, sidx: int, lo: int, hi: int, *, seed: int, epoch: int, unit: int,
                   resampled: bool, bufsize: int, handler: SkipCounter) -> Iterator[dict]:
    """The unit's window [lo, hi) of one source, buffer-shuffled, then the samples after it (top-up)."""
    pieces = (_resampled_pieces(src, seed, epoch, sidx, unit) if resampled
              else _pieces(src, seed, epoch, sidx, lo))
    raw = _raw_samples(pieces, handler, len(src.urls))
    window = itertools.islice(raw, hi - lo)
    if bufsize > 1:
        window = wds.shuffle(bufsize, initial=bufsize, seed=_seed(seed, "buffer", epoch, sidx, unit))(window)
    for sample in itertools.chain(window, raw):
        sample["__source__"] = sidx
        yield sample


# ---------------------------------------------------------------------------------------------------
# Safe decoding
# ---------------------------------------------------------------------------------------------------


def image_members(raw: dict, meta: dict) -> tuple[list, list]:
    """(member names, view positions) of a sample's images: its json ``views``, else its one jpg/png."""
    views = meta.get("views")
    if isinstance(views, list) and views:
        members = [v.get("member") if isinstance(v, dict) else None for v in views]
        missing = [m for m in members if m not in raw]
        if missing:
            raise ValueError(f"sample {raw.get('__key__')!r}: view member(s) {missing} listed in json but absent")
        return members, [str(v.get("view") or "") for v in views]
    ext = next((e for e in _IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw.get('__key__')!r} has no image (jpg/png)")
    return [ext], [str(meta.get("view") or "")]


def choose_views(positions: list, rule: str, two: bool, rng: random.Random) -> list:
    """Indices of the images a training sample uses (see the module doc); one or, for ``pair``, two."""
    n = len(positions)
    if n == 1:
        return [0]
    if rule == "frontal":
        return [rng.choice([i for i, p in enumerate(positions) if is_frontal(p)] or list(range(n)))]
    first = rng.randrange(n)
    if rule == "pair" and two:
        return [first, rng.choice([i for i in range(n) if i != first])]
    return [first]


def eval_view(positions: list) -> list:
    """The image evaluation reads: the first frontal one, else the first."""
    return [next((i for i, p in enumerate(positions) if is_frontal(p)), 0)]


def decode_sample(raw: dict, in_chans: int, target: int, pick=None) -> dict:
    """Images, report and metadata from a raw sample; raises ValueError on anything unusable.

    ``pick(raw, view positions)`` gives the indices of the images to decode (default: the first); they come
    back in ``images``, in that order.
    """
    if "txt" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} has no report (txt)")
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    if not isinstance(meta, dict):
        raise ValueError(f"sample {raw.get('__key__')!r}: json member is not an object")
    members, positions = image_members(raw, meta)
    chosen = pick(raw, positions) if pick is not None else [0]
    return {"key": raw["__key__"], "origin": (raw.get("__source__"), raw.get("__draw__")),
            "images": [decode_image(raw[members[i]], in_chans, target) for i in chosen],
            "text": raw["txt"].decode("utf-8"), "meta": meta}


def _decoded(raws: Iterator[dict], handler: SkipCounter, in_chans: int, target: int, counter: dict,
             pick=None) -> Iterator[dict]:
    """Decode, counting raw samples pulled (the resume position) and skipping the undecodable."""
    for raw in raws:
        counter["raw"] += 1
        try:
            yield decode_sample(raw, in_chans, target, pick)
        except Exception as exn:  # noqa: BLE001 - any decoder error means a corrupt sample: skip it
            handler.skip(raw.get("__url__", "?"), ValueError(f"{raw.get('__key__')!r} in {raw.get('__url__')}: {exn!r}"))


# ---------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------


def _tokenize(tokenizer, texts: list, max_length: int) -> dict:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt",
                     return_special_tokens_mask=True)


def mlm_mask(input_ids: torch.Tensor, special: torch.Tensor, draws: torch.Tensor, probability: float, mask_id: int,
             random_ids: torch.Tensor) -> tuple:
    """BERT masking (80% [MASK], 10% random token, 10% kept) of non-special tokens.

    ``draws`` (B x 3 x L uniforms, from each sample's own seeded generator) make it reproducible per sample
    and vectorised per batch. Every row with a maskable token gets at least one target (the one with the
    smallest draw), so the loss is never over zero labels.
    """
    candidate = special == 0
    select_u = torch.where(candidate, draws[:, 0], torch.full_like(draws[:, 0], 2.0))
    chosen = select_u < probability
    first = torch.zeros_like(chosen).scatter_(1, select_u.argmin(1, keepdim=True), True)
    chosen |= first & candidate & ~chosen.any(1, keepdim=True)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = draws[:, 1]
    swapped = random_ids[(draws[:, 2] * len(random_ids)).long().clamp_(max=len(random_ids) - 1)]
    ids = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), swapped, ids)
    return ids, labels


class _Collate:
    """Samples to the Batch dict of the seam (tokenization happens here, once per batch)."""

    def __init__(self, cfg: Config, tokenizer, needs: BatchNeeds):
        self.cfg, self.tokenizer, self.needs = cfg, tokenizer, needs
        self.max_length = cfg.data.text.max_length
        self.mean, self.std = normalisation(cfg.data)
        if needs.mlm:
            if tokenizer.mask_token_id is None:
                raise ValueError("masked language modelling needs a tokenizer with a mask token")
            special = set(tokenizer.all_special_ids)
            self.random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def train(self, samples: list) -> dict:
        chans = self.cfg.data.in_chans
        batch = {"image": to_tensor([s["view1"] for s in samples], chans, self.mean, self.std),
                 "key": [s["key"] for s in samples],
                 "report_id": torch.tensor([report_id(s["text"]) for s in samples], dtype=torch.long),
                 "group_id": torch.tensor([group_id(s) for s in samples], dtype=torch.long)}
        if self.needs.image_view2:
            batch["image_view2"] = to_tensor([s["view2"] for s in samples], chans, self.mean, self.std)
        tok = _tokenize(self.tokenizer, [s["text"] for s in samples], self.max_length)
        batch["input_ids"], batch["attention_mask"] = tok["input_ids"], tok["attention_mask"]
        if self.needs.text_view2:
            tok2 = _tokenize(self.tokenizer, [s["text2"] for s in samples], self.max_length)
            batch["text_view2_ids"], batch["text_view2_mask"] = tok2["input_ids"], tok2["attention_mask"]
        if self.needs.mlm:
            draws = torch.from_numpy(np.stack([s["mlm_draws"] for s in samples]))
            batch["mlm_input_ids"], batch["mlm_labels"] = mlm_mask(
                tok["input_ids"], tok["special_tokens_mask"], draws, self.cfg.data.mlm_probability,
                self.tokenizer.mask_token_id, self.random_ids)
        return batch

    def eval(self, samples: list) -> dict:
        tok = _tokenize(self.tokenizer, [s["text"] for s in samples], self.max_length)
        return {"image": to_tensor([s["view1"] for s in samples], self.cfg.data.in_chans, self.mean, self.std),
                "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                "key": [s["key"] for s in samples], "text": [s["text"] for s in samples],
                "labels": [list(s["meta"].get("labels", [])) for s in samples],
                "meta": [s["meta"] for s in samples]}  # beyond the seam: other label fields (eval.label_key)


# ---------------------------------------------------------------------------------------------------
# Training stream
# ---------------------------------------------------------------------------------------------------


def _batches(samples: Iterator[dict], size: int, collate, partial: bool) -> Iterator[dict]:
    """Emit each batch as soon as it is full (``wds.batched`` first pulls the next sample, which would
    put the resume position one sample late)."""
    batch: list = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


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


def _windows(total: int, units: int, unit: int) -> tuple:
    return unit * total // units, (unit + 1) * total // units


class _TrainUnits(IterableDataset):
    """What one DataLoader worker runs: its logical unit's batches, epoch after epoch, from its cursor."""

    def __init__(self, cfg: Config, tokenizer, needs: BatchNeeds, sources: list, quotas: list, rank: int,
                 workers: int, world_size: int, batches_per_unit: int, cursors: list, first_worker: int):
        super().__init__()
        self.cfg, self.needs, self.sources, self.quotas = cfg, needs, sources, quotas
        self.rank, self.workers, self.world_size = rank, workers, world_size
        self.batches_per_unit, self.cursors, self.first_worker = batches_per_unit, cursors, first_worker
        self.collate = _Collate(cfg, tokenizer, needs)
        self.augment = TrainAugment(cfg.data)
        self.mask_token = tokenizer.mask_token or "[MASK]"

    def _mixed(self, epoch: int, unit: int, bufsize: int, handler: SkipCounter) -> Iterator[dict]:
        """Deterministic weighted mix: a seeded permutation with exact per-source counts, then weighted draws."""
        units, d = self.world_size * self.workers, self.cfg.data
        streams, labels = [], []
        for sidx, (src, quota) in enumerate(zip(self.sources, self.quotas)):
            lo, hi = _windows(quota, units, unit)
            streams.append(_source_stream(src, sidx, lo, hi, seed=self.cfg.seed, epoch=epoch, unit=unit,
                                          resampled=d.resampled, bufsize=bufsize, handler=handler))
            labels += [sidx] * (quota // units)
        rng = random.Random(_seed(self.cfg.seed, "mix", epoch, unit))
        rng.shuffle(labels)
        weights = [s.weight for s in self.sources]
        top_up = iter(lambda: rng.choices(range(len(streams)), weights=weights)[0], None)
        for sidx in itertools.chain(labels, top_up):
            yield next(streams[sidx])

    def _pick(self, epoch: int):
        """The training view choice for ``decode_sample``, seeded per sample and epoch (exact on resume)."""
        def pick(raw: dict, positions: list) -> list:
            origin = (raw.get("__source__"), raw.get("__draw__"))
            rng = random.Random(_seed(self.cfg.seed, "view", epoch, origin, raw["__key__"]))
            return choose_views(positions, self.cfg.data.view, self.needs.image_view2, rng)
        return pick

    def _prepare(self, sample: dict, epoch: int) -> dict:
        d, seed = self.cfg.data, _seed(self.cfg.seed, "sample", epoch, sample["origin"], sample["key"])
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

    def _epoch(self, worker: int, cursor: dict, handler: SkipCounter) -> Iterator[dict]:
        """Batches of one epoch of one unit, starting after ``cursor`` (consumed raw samples skipped undecoded,
        and not counted again). An epoch takes ``batches_per_unit`` micro batches' worth of samples; a cursor
        saved with another micro batch size may leave fewer than one batch at the end, dropped like the
        epoch's remainder always is."""
        epoch, unit = cursor["epoch"], self.rank * self.workers + worker
        mb = self.cfg.train.micro_batch_size
        counter = {"raw": cursor["raw"]}
        left = (self.batches_per_unit * mb - cursor["taken"]) // mb * mb
        pipeline = wds.DataPipeline(
            lambda: self._mixed(epoch, unit, cursor["bufsize"], handler),
            lambda raws: _after_replay(raws, cursor["raw"], handler),
            lambda raws: _decoded(raws, handler, self.cfg.data.in_chans, self.cfg.data.image_size, counter,
                                  self._pick(epoch)),
            lambda samples: itertools.islice(samples, left),
            lambda samples: (self._prepare(s, epoch) for s in samples),
            lambda samples: _batches(samples, mb, self.collate.train, partial=False),
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
            if self.batches_per_unit * mb - cursor["taken"] >= mb:  # else: saved after its epoch's last batch
                yield from self._epoch(worker, cursor, handler)
            cursor = {"epoch": cursor["epoch"] + 1, "raw": 0, "taken": 0, "bufsize": self.cfg.data.shuffle_buffer}


class TrainStream:
    """Endless training batches for one rank; ``steps_per_epoch`` is identical on every rank.

    ``state_dict()`` describes the position after the last batch handed out; ``load_state_dict`` before
    iterating resumes exactly there (same samples, same augmentation).
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
        total = sum(s.total for s in self.sources)
        per_epoch = cfg.data.samples_per_epoch or total
        weight_sum = sum(s.weight for s in self.sources)
        self.quotas = [round(per_epoch * s.weight / weight_sum) for s in self.sources]
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
        self._plan = _seed(shard_lists, self.quotas, cfg.data.resampled)
        self._delivered = 0
        self._cursors = [self._fresh_cursor(0, SkipCounter()) for _ in range(self.workers)]

    def _fresh_cursor(self, epoch: int, skips: SkipCounter) -> dict:
        return {"epoch": epoch, "raw": 0, "taken": 0, "bufsize": self.cfg.data.shuffle_buffer, "skips": skips.state()}

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
        c = self._cursors[self._delivered % self.workers]
        done = self.batches_per_unit * self.micro_batch_size - c["taken"] < self.micro_batch_size
        return c["epoch"] + 1 if done else c["epoch"]

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "delivered": self._delivered,
                "cursors": [json.loads(json.dumps(c)) for c in self._cursors], **self._layout()}

    def _layout(self) -> dict:
        return {"rank": self.rank, "workers": self.workers, "world_size": self.world_size, "seed": self.cfg.seed,
                "micro_batch_size": self.micro_batch_size, "steps_per_epoch": self.steps_per_epoch,
                "plan": self._plan}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state`` (a ``state_dict()`` from a checkpoint), before iterating.

        * The same layout, or another micro batch size (positions count samples): exactly where it stopped.
          Another shuffle buffer: the current epoch finishes in its saved order; the new one applies from the
          next epoch.
        * Another number of workers, seed or data plan (sources, weights, epoch size), another loader version,
          or (``strict=False``) another rank / world size: positions inside an epoch do not map, so the stream
          restarts at the beginning of the next epoch, with a message.
        ``strict`` refuses (ValueError) a state saved by another rank or world size: that happens only when the
        caller passes one knowingly (a world-size change, with ``strict=False``)."""
        now = self._layout()
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if strict and ("rank" in diff or "world_size" in diff):
            raise ValueError(f"loader state of rank {state.get('rank')} of {state.get('world_size')} ranks given "
                             f"to rank {self.rank} of {self.world_size}")
        if state.get("version") == _STATE_VERSION and set(diff) <= {"micro_batch_size", "steps_per_epoch"}:
            self._delivered = int(state["delivered"])
            self._cursors = [json.loads(json.dumps(c)) for c in state["cursors"]]
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
        cursors = state.get("cursors", [])
        next_epoch = max((c["epoch"] + (1 if c.get("raw", 0) else 0) for c in cursors), default=0)
        own = state.get("rank") == self.rank  # another rank's counts stay with that rank (world-size change)
        carried = SkipStats.combine([SkipStats(**c["skips"]) for c in cursors if own and "skips" in c])
        self._delivered = next_epoch * self.steps_per_epoch
        self._cursors = [self._fresh_cursor(next_epoch, SkipCounter(carried if i == 0 else None))
                         for i in range(self.workers)]
        self._note("data stream: %s: positions inside an epoch do not carry over, so it restarts at the beginning "
                   "of epoch %d", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()), next_epoch)

    def _note(self, message: str, *args) -> None:
        if self.rank == 0:
            log.warning(message, *args)

    def __iter__(self) -> Iterator[dict]:
        dataset = _TrainUnits(self.cfg, self.tokenizer, self.needs, self.sources, self.quotas, self.rank,
                              self.workers, self.world_size, self.batches_per_unit, self._cursors,
                              first_worker=self._delivered % self.workers)
        if self.num_workers > 0:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=torch.cuda.is_available()))  # async host-to-GPU copies
        else:
            batches = iter(dataset)
        for batch in batches:
            cursor = batch.pop("_cursor")
            self._cursors[cursor.pop("worker")] = cursor
            self._delivered += 1
            yield batch


# ---------------------------------------------------------------------------------------------------
# Evaluation loader
# ---------------------------------------------------------------------------------------------------


class _EvalUnits(IterableDataset):
    """One unit's contiguous share of the unshuffled samples, deterministic transform, partial last batch."""

    def __init__(self, cfg: Config, tokenizer, sources: list, rank: int, world_size: int, workers: int,
                 batch_size: int, keys: frozenset | None = None):
        super().__init__()
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.workers, self.batch_size, self.keys = workers, batch_size, keys
        self.collate = _Collate(cfg, tokenizer, BatchNeeds())
        self.transform = EvalTransform(cfg.data)

    def _prepare(self, sample: dict) -> dict:
        sample["view1"] = self.transform(sample.pop("images")[0])
        sample["text"] = model_text(sample["text"], self.cfg.data.text.sections, self.cfg.data.text.order)
        return sample

    def _raws(self, unit: int, handler: SkipCounter) -> Iterator[dict]:
        units = self.world_size * self.workers
        for src in self.sources:
            lo, hi = _windows(src.total, units, unit)
            pieces, pos = [], 0
            for url, n in zip(src.urls, src.counts):
                if pos < hi and pos + n > lo:
                    pieces.append((url, max(0, lo - pos), min(n, hi - pos), 0))
                pos += n
            yield from _raw_samples(iter(pieces), handler, len(pieces) + 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        unit = self.rank * self.workers + (info.id if info else 0)
        handler = SkipCounter()
        d = self.cfg.data
        pipeline = wds.DataPipeline(
            lambda: self._raws(unit, handler),
            lambda raws: (r for r in raws if self.keys is None or r["__key__"] in self.keys),  # before decoding
            lambda raws: _decoded(raws, handler, d.in_chans, d.image_size, {"raw": 0}, lambda _, v: eval_view(v)),
            lambda samples: (self._prepare(s) for s in samples),
            lambda samples: _batches(samples, self.batch_size, self.collate.eval, partial=True),
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
    return DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers)
