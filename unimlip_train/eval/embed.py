"""Distributed embedding extraction: every rank embeds its part of an eval set, then all ranks gather everything.

Determinism regardless of world size: the gathered set is sorted by sample key, so rank r's samples land in the
same rows whether 1 or 8 processes ran. The only collectives are the final gathers, which every rank reaches
(no rank-0-only loop while others wait), so uneven per-rank sample counts are fine. A ZeRO-3 model must have its
weights gathered around the call (``deepspeed.zero.GatheredParameters``, as the trainer does): the towers call
submodules outside their own ``forward``, which ZeRO-3's fetch hooks do not see.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import webdataset as wds
from tqdm import tqdm

from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.plan import windows
from unimlip_train.data.shards import ShardSource, iter_raw_samples, resolve_sources
from unimlip_train.format.limits import ContentError, parse_json_member


@dataclass
class EmbeddedSet:
    """Embeddings of one eval set in key order: row i of ``image`` / ``text`` belongs to ``keys[i]``."""

    keys: list[str]
    image: torch.Tensor  # N x D, L2-normalised, float32, CPU
    text: torch.Tensor  # N x D
    texts: list[str]  # the cleaned reports the text embeddings came from
    labels: list[list[str]]
    groups: list[str] = field(default_factory=list)  # each sample's patient / study (metadata group, else key)
    previews: dict = field(default_factory=dict)  # key -> C x H x W input image, a few of this rank's only

    def subset(self, n: int) -> "EmbeddedSet":
        """The first ``n`` samples in key order (deterministic for any world size)."""
        keys = self.keys[:n]
        kept = set(keys)
        return EmbeddedSet(keys, self.image[:n], self.text[:n], self.texts[:n], self.labels[:n], self.groups[:n],
                           {k: v for k, v in self.previews.items() if k in kept})


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def _encode(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = model.encode_image(batch["image"].to(device, non_blocking=True))
    text = model.encode_text(batch["input_ids"].to(device, non_blocking=True),
                             batch["attention_mask"].to(device, non_blocking=True))
    return image.float(), text.float()


def _gather_rows(local: torch.Tensor, counts: list[int], dim: int) -> torch.Tensor:
    """All-gather row blocks of uneven length by padding each to the longest (all_gather needs equal shapes)."""
    device = _collective_device()
    padded = torch.zeros(max(counts), dim, dtype=torch.float32, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu()


def gather_embedded(local: EmbeddedSet, world_size: int, error: str = "") -> EmbeddedSet:
    """Every rank's samples on every rank, sorted by key (identical result on all ranks).

    ``error``: why this rank could not embed its share. It travels with the gather, so every rank raises it
    instead of the others waiting in the collective until a timeout.
    """
    if _distributed(world_size):
        metas: list = [None] * world_size
        dim = local.image.shape[1] if local.image.numel() else -1
        dist.all_gather_object(metas, (local.keys, local.texts, local.labels, dim, error, local.groups))
        failed = [m[4] for m in metas if m[4]]
        if failed:
            raise RuntimeError(f"evaluation failed on {len(failed)} rank(s): {failed[0]}")
        counts = [len(m[0]) for m in metas]
        dim = max(m[3] for m in metas)
        if dim < 0:
            raise ValueError("the eval set is empty on every rank")
        image = _gather_rows(local.image.reshape(-1, dim), counts, dim)
        text = _gather_rows(local.text.reshape(-1, dim), counts, dim)
        keys = [k for m in metas for k in m[0]]
        texts = [t for m in metas for t in m[1]]
        labels = [lab for m in metas for lab in m[2]]
        groups = [g for m in metas for g in m[5]]
    else:
        keys, image, text, texts, labels = local.keys, local.image, local.text, local.texts, local.labels
        groups = local.groups
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys in the eval set: keys must be unique for a deterministic order")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.tensor(order, dtype=torch.long)
    return EmbeddedSet([keys[i] for i in order], image[idx], text[idx], [texts[i] for i in order],
                       [list(labels[i]) for i in order], [groups[i] for i in order])


def meta_labels(meta: dict, label_key: str) -> list[str]:
    """A sample's labels from its metadata field ``label_key``: a string becomes a one-element list, a missing
    field an empty one."""
    v = meta.get(label_key)
    return [] if v is None else [str(v)] if isinstance(v, (str, int, float)) else [str(x) for x in v]


def batch_labels(batch: dict, label_key: str) -> list[list[str]]:
    """Per-sample label lists: the batch's ``labels`` (metadata ``labels``), or another metadata field."""
    if label_key == "labels":
        return batch["labels"]
    if "meta" not in batch:
        raise ValueError(f"label key {label_key!r}: eval batches carry only the 'labels' metadata field")
    return [meta_labels(m, label_key) for m in batch["meta"]]


def _metadata(raw: dict) -> dict:
    try:
        meta = parse_json_member(raw["json"]) if "json" in raw else {}
    except ContentError:
        return {}  # a corrupt sample: the loader skips it too
    return meta if isinstance(meta, dict) else {}


def list_samples(sources: list[ShardSource]) -> list[list[tuple[str, dict]]]:
    """``(key, metadata)`` of every sample of each source, in the order the eval loader reads them (the images
    are not decoded)."""
    return [[(raw["__key__"], _metadata(raw))
             for url in src.urls for raw in iter_raw_samples(url, wds.ignore_and_continue)] for src in sources]


def sample_keys(listed: list[list[tuple[str, dict]]], n: int, seed: int) -> frozenset:
    """A seeded random subset of ``n`` keys (all of them when there are fewer), the same on every rank."""
    keys = sorted(k for src in listed for k, _ in src)
    return frozenset(keys if n >= len(keys) else random.Random(seed).sample(keys, n))


def rank_share(sources: list[ShardSource], rank: int, world_size: int, workers: int,
               listed: list[list[tuple[str, dict]]] | None = None, keys: frozenset | None = None) -> int:
    """How many samples the eval loader gives this rank (its workers' windows; only ``keys`` when given)."""
    units = world_size * workers
    total = 0
    for i, src in enumerate(sources):
        for unit in range(rank * workers, (rank + 1) * workers):
            lo, hi = windows(src.total, units, unit)
            total += hi - lo if keys is None else sum(k in keys for k, _ in listed[i][lo:hi])
    return total


def embed_split(model: torch.nn.Module, cfg, tokenizer, source: str, split: str, rank: int, world_size: int,
                batch_size: int = 64, max_samples: int = 0, progress: bool = False,
                label_key: str = "labels", previews: int = 0, sample: int = 0, seed: int = 0) -> EmbeddedSet:
    """Embed every sample of ``source``/``split`` across all ranks; the result is identical on every rank.

    ``sample`` > 0 embeds only a seeded random subset of that many samples (PMC-CLIP's 2,000-pair ROCO
    protocol), skipping the others before decoding, so the cost follows the subset. ``max_samples`` > 0 keeps the
    first samples in key order after gathering (it bounds the metric cost, not the embedding cost).
    ``label_key`` picks the metadata field read as labels. ``previews`` > 0 keeps the input images of the first
    samples this rank embedded (not gathered), for pictures of retrieval examples. The model must be in eval mode.
    """
    device = model_device(model)
    sources = resolve_sources(source, split)
    listed = list_samples(sources) if sample > 0 else None
    keys = sample_keys(listed, sample, seed) if listed is not None else None
    loader = build_eval_loader(cfg, source, tokenizer, batch_size, rank, world_size, split=split, keys=keys)
    share = rank_share(sources, rank, world_size, max(1, cfg.data.num_workers), listed, keys) if progress else None
    ids, texts, labels, groups, images, reports = [], [], [], [], [], []
    kept: dict = {}
    error = ""
    bar = tqdm(desc=f"embed {split}", total=share, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            image, text = _encode(model, batch, device)
            images.append(image.cpu())
            reports.append(text.cpu())
            ids.extend(batch["key"])
            texts.extend(batch["text"])
            labels.extend(batch_labels(batch, label_key))
            groups.extend(str(m.get("group") or k) for m, k in zip(batch["meta"], batch["key"]))
            for key, picture in zip(batch["key"][: previews - len(kept)], batch["image"]):
                kept[key] = picture.clone()
            bar.update(len(batch["key"]))
    except Exception as e:
        if not _distributed(world_size):
            raise
        error = f"rank {rank}: {type(e).__name__}: {e}"
        ids, texts, labels, groups, images, reports = [], [], [], [], [], []
    bar.close()
    dim = images[0].shape[1] if images else 0
    local = EmbeddedSet(ids, torch.cat(images) if images else torch.zeros(0, dim),
                        torch.cat(reports) if reports else torch.zeros(0, dim), texts, labels, groups)
    gathered = gather_embedded(local, world_size, error)
    gathered.previews = kept
    if not gathered.keys:
        raise ValueError(f"no samples in eval source {source!r} (split {split!r})")
    return gathered.subset(max_samples) if max_samples > 0 else gathered
