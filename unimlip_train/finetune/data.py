"""Fine-tuning data: the samples of a split listed without decoding, then streamed as ``(key, image, metadata)``
items, only the selected keys decoded, in a seeded shuffled order for training.

Images get the checkpoint's deterministic eval transform (its size and normalisation). Datasets are read from
the shards every epoch, so a 100 % label fraction of a large set never has to fit in memory.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import webdataset as wds

from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.shards import resolve_sources
from unimlip_train.eval.embed import list_samples


def split_samples(source: str, split: str) -> list[tuple[str, dict]]:
    """``(key, metadata)`` of every sample of ``split`` (ValueError naming the splits there are when missing)."""
    return [s for listed in list_samples(resolve_sources(source, split)) for s in listed]


def split_problem(source: str, split: str) -> str:
    """'' when ``source`` has a non-empty ``split``, else why not (naming the splits it has)."""
    try:
        resolve_sources(source, split)
    except ValueError as e:
        return str(e)
    return ""


def has_split(source: str, split: str) -> bool:
    return not split_problem(source, split)


def items(cfg, source: str, split: str, tokenizer, keys: frozenset,
          batch_size: int = 64) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """``(key, C x H x W image, metadata)`` of the ``keys`` of a split, in shard order."""
    for batch in build_eval_loader(cfg, source, tokenizer, batch_size, 0, 1, split=split, keys=keys):
        for i, key in enumerate(batch["key"]):
            yield key, batch["image"][i], batch["meta"][i]


def shuffled(things: Iterable, buffer: int, seed: int) -> Iterator:
    """A seeded buffer shuffle (WebDataset's), for an epoch's training order."""
    return wds.shuffle(buffer, initial=buffer, seed=seed)(iter(things))


def batched(things: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for thing in things:
        batch.append(thing)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
