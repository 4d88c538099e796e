"""Collation: prepared samples to the batch dict the model and the losses read, one batch at a time.

Which optional entries a batch carries follows the enabled loss terms (``BatchNeeds``). Reports are tokenized
here, once per batch; masked language modelling masks them with each sample's own seeded draws, so a resumed
stream masks exactly as the uninterrupted one. ``report_id`` and ``group_id`` give each sample's identity (same
report after normalisation, same patient / study): the contrastive terms treat equal ids as positives.
``label_id`` names the report's label set, for ``loss.text_positives=labels``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from unimlip_train.config.schema import Config, LossConfig
from unimlip_train.data.plan import stable_seed
from unimlip_train.data.transforms import normalisation, to_tensor
from unimlip_train.format.report_text import report_id


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


def group_id(sample: dict) -> int:
    """A 63-bit id of the sample's group (patient / study, the shard json's ``group``; its key without one)."""
    group = str(sample["meta"].get("group") or sample["key"])
    return stable_seed("group", group) >> 1


def label_id(sample: dict) -> int:
    """A 63-bit id of the sample's label set (the shard json's ``labels``, order ignored); a sample without
    labels gets an id of its own, so unlabelled reports never count as alike."""
    labels = sorted(set(map(str, sample["meta"].get("labels") or [])))
    if not labels:
        return stable_seed("unlabelled", sample["key"]) >> 1
    return stable_seed("labels", *labels) >> 1


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


class Collate:
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
                 "group_id": torch.tensor([group_id(s) for s in samples], dtype=torch.long),
                 "label_id": torch.tensor([label_id(s) for s in samples], dtype=torch.long)}
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


def collated_batches(samples: Iterator[dict], size: int, collate, partial: bool) -> Iterator[dict]:
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
