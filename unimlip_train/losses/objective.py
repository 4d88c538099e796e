"""The Uni-Mlip objective: the weighted sum of the enabled terms, each also reported unweighted.

Identity: ``loss.positives`` says which other samples of a batch count as the same pair (``report``: equal
normalised report, ``report+group``: or the same patient/study, ``none``: only the sample itself).
``loss.text_positives=labels`` adds, for the text SSL pair only, reports with the same label set: kept out of
``text_ssl`` / ``text_feature``'s negatives (false-negative elimination, Huynh et al. 2022, with the labels
MedCLIP matches on, Wang et al. 2022), while ITC keeps plain identity (labels there would be supervision);
``labels_ssl`` does so in ``text_ssl`` alone, whose head space nothing else reads, so ``text_feature`` (in the
shared space under the pooled preset) keeps pushing same-label reports apart. Either logs ``label_alike``.

Negatives across gradient accumulation (``train.negatives=accumulated``, open_clip's ``--accum-freq``,
GradCache): a first, gradient-free forward of the step's K micro batches caches the contrastive embeddings
(``cache_entry``); then each micro batch k is recomputed with gradients (its random state replayed by the
trainer, so the recomputation equals the cached pass) and every contrastive term scores the *whole* step's
batch, micro batch k live and the others from the cache. Summed over k, the gradients of the embeddings are
exactly those of one loss over all K micro batches. Two corrections make the sum exact: a contrastive term's
value enters micro batch k's loss K times (the engine divides every micro loss by K), and the temperature
(and sigmoid bias), which every micro batch sees live, carries only 1/K of its gradient each time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.losses.contrastive import positive_mask
from unimlip_train.losses.terms import TERMS

_SHARED_SCALARS = ("logit_scale", "logit_bias")
_LABEL_TERMS = {"identity": set(), "labels": {"text_ssl", "text_feature"}, "labels_ssl": {"text_ssl"}}


def identity(batch: dict, positives: str) -> Optional[torch.Tensor]:
    """The ids the contrastive terms compare (``contrastive.same_identity``), or None for ``none``."""
    if positives == "none":
        return None
    for key in ("report_id", "group_id") if positives == "report+group" else ("report_id",):
        if key not in batch:
            raise KeyError(f"loss.positives={positives} needs batch['{key}'] (the loader adds it); "
                           "set loss.positives=none to train without identities")
    if positives == "report":
        return batch["report_id"]
    return torch.stack([batch["report_id"], batch["group_id"]], dim=1)


def label_identity(batch: dict, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``ids`` with the report's label set (``batch['label_id']``) as one more identity column."""
    if "label_id" not in batch:
        raise KeyError("loss.text_positives' label positives need batch['label_id'] (the loader adds it)")
    labels = batch["label_id"]
    if ids is None:
        return labels
    return torch.cat([ids.reshape(len(labels), -1), labels[:, None]], dim=1)


def label_alike(ids: Optional[torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    """Reports per local report that label positives add across the global batch (same label set, other
    identity); averaged over ranks, the single-process count. 0 shows the option changes nothing (no labels)."""
    n, device = len(label_ids), label_ids.device
    return (positive_mask(label_ids, n, device) & ~positive_mask(ids, n, device)).sum(1).float().mean()


@dataclass
class AccumulationCache:
    """The no-grad contrastive embeddings and ids of one optimizer step's micro batches, and which one is
    being recomputed with gradients now."""

    entries: list
    index: int


class UniMlipObjective(nn.Module):
    """Builds every term whose ``cfg.loss.<term>.weight`` is non-zero; ``forward`` returns ``(loss, logs)``:
    the loss to back-propagate, and detached scalars ``{"loss": sum(weight * term), <term name>: unweighted
    term value, <extra counters>}`` (the two losses differ only under accumulation, see above).

    ``loss.aux_warmup_steps`` = N > 0: every weight but ITC's is multiplied by min(1, s / N) at optimizer
    step s (0 at the first step, full from step N on; logged as ``aux_scale``), so the auxiliary terms join
    once the image-text alignment has started (a ramp of the kind ALBEF uses for its distillation weight).
    ``step`` is the trainer's micro-step counter (optimizer step x ``train.grad_accum`` + micro batch), so
    the micro batches of one optimizer step share one scale."""

    def __init__(self, cfg: Config):
        super().__init__()
        enabled = cfg.loss.enabled()
        self.weights = {name: term_cfg.weight for name, term_cfg in enabled.items()}
        self.terms = nn.ModuleDict({name: TERMS[name](cfg) for name in enabled})
        self.positives = cfg.loss.positives
        self.label_terms = _LABEL_TERMS[cfg.loss.text_positives]
        self.aux_warmup_steps, self.grad_accum = cfg.loss.aux_warmup_steps, cfg.train.grad_accum

    def aux_scale(self, step: int) -> float:
        """The auxiliary terms' weight multiplier at micro step ``step``."""
        if self.aux_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step // self.grad_accum) / self.aux_warmup_steps)

    @property
    def cached_keys(self) -> tuple:
        """Model outputs the contrastive terms read: what an accumulation cache holds."""
        return tuple(dict.fromkeys(k for t in self.terms.values() if t.contrastive for k in t.inputs))

    def identities(self, batch: dict) -> dict:
        """The ids each contrastive term compares, by kind: ``ids`` for all, ``label_ids`` for ``label_terms``."""
        ids = identity(batch, self.positives)
        return {"ids": ids, "label_ids": label_identity(batch, ids) if self.label_terms else None}

    def cache_entry(self, batch: dict, outputs: dict) -> dict:
        """One micro batch's contribution to an ``AccumulationCache`` (detached)."""
        return {"emb": {k: outputs[k].detach() for k in self.cached_keys}, **self.identities(batch)}

    def _accumulated(self, outputs: dict, ids: dict, cache: AccumulationCache) -> tuple:
        """Outputs and ids of the whole step: micro batch ``cache.index`` live, the others cached."""
        k, entries = cache.index, cache.entries
        acc = dict(outputs)
        for key in self.cached_keys:
            acc[key] = torch.cat([outputs[key] if j == k else e["emb"][key] for j, e in enumerate(entries)])
        for key in _SHARED_SCALARS:
            if key in outputs:
                v = outputs[key]
                acc[key] = v.detach() + (v - v.detach()) / len(entries)
        acc_ids = {kind: None if live is None else torch.cat([live if j == k else e[kind] for j, e in enumerate(entries)])
                   for kind, live in ids.items()}
        return acc, acc_ids

    def replay_error(self, outputs: dict, cache: AccumulationCache) -> torch.Tensor:
        """Largest absolute difference between this recomputed micro batch's contrastive embeddings and the
        cached ones (logged as ``accum_replay_max_abs``): 0 when the replay is exact, as the gradient's
        exactness needs; non-zero flags a non-deterministic kernel or a random draw outside the replayed state."""
        entry = cache.entries[cache.index]["emb"]
        return torch.stack([(outputs[key].detach() - entry[key]).abs().max().float() for key in self.cached_keys]).max()

    def forward(self, batch: dict, outputs: dict, model: nn.Module, step: int,
                cache: Optional[AccumulationCache] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.identities(batch)
        acc, acc_ids, repeat = outputs, ids, 1
        total, value, logs = 0.0, 0.0, {}
        if cache is not None:
            acc, acc_ids = self._accumulated(outputs, ids, cache)
            repeat = len(cache.entries)
            if self.cached_keys:
                logs["accum_replay_max_abs"] = self.replay_error(outputs, cache)
        scale = self.aux_scale(step)
        for name, term in self.terms.items():
            kind = "label_ids" if name in self.label_terms else "ids"
            if term.contrastive:
                result, factor = term(batch, acc, model, step, acc_ids[kind]), repeat
            else:
                result, factor = term(batch, outputs, model, step, ids[kind]), 1
            extra = result if isinstance(result, dict) else {name: result}
            weight = self.weights[name] * (1.0 if name == "itc" else scale)
            total = total + weight * factor * extra[name]
            value = value + weight * extra[name].detach()
            logs.update({k: v.detach() for k, v in extra.items()})
        if self.label_terms:
            logs["label_alike"] = label_alike(ids["ids"], ids["label_ids"])
        if self.aux_warmup_steps > 0:
            logs["aux_scale"] = torch.tensor(scale, device=value.device)
        return total, {"loss": value, **logs}
