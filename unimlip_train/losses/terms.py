"""The eight Uni-Mlip loss terms: scope (cross / image / text / fused) x level (data / feature).

Each term is a small module called with the batch, the model outputs (see ``UniMlip.forward``), the model
itself (fused terms run its fusion encoder and heads inside the training forward, so ZeRO-3 gathers their
parameters), the step (seeds ITM's negative sampling) and the samples' identities (``ids``: which other
samples carry the same report or group, see ``contrastive``). It returns its unweighted scalar value, or a
dict holding it under the term's name plus extra counters to log.

Contrastive terms (``contrastive = True``) score a batch against negatives gathered from every rank; under
gradient accumulation they receive the outputs of all the optimizer step's micro batches (see
``objective``). MLM and ITM are per micro batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.losses.contrastive import at_least_fp32, contrastive_loss, nt_xent, positive_mask, sigmoid_loss
from unimlip_train.losses.gather import all_gather_no_grad, exchange_rows, global_max, global_sum, world
from unimlip_train.losses.hard_negatives import sample_hard_negatives


class Term(nn.Module):
    """Base: a named loss term; ``inputs`` are the two model outputs a contrastive term contrasts."""

    name = ""
    contrastive = False
    inputs: tuple = ()

    def __init__(self, cfg: Config):
        super().__init__()
        self.temperature = getattr(cfg.loss, self.name).temperature
        self.itc_kind = cfg.loss.itc.kind
        self.seed = cfg.seed


class _ImageText(Term):
    """Image-text contrast between ``inputs`` (image side, text side) with the model's learnable temperature:
    symmetric InfoNCE (CLIP) or, with ``loss.itc.kind=sigmoid``, the SigLIP loss; same-identity pairs are
    positives."""

    contrastive = True

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        image, text = (out[k] for k in self.inputs)
        if self.itc_kind == "sigmoid":
            return sigmoid_loss(image, text, out["logit_scale"], out["logit_bias"], ids)
        return contrastive_loss(image, text, out["logit_scale"], ids)


class _TwoViews(Term):
    """NT-Xent between two views (``inputs``) at the term's fixed temperature; same-identity samples are not
    negatives."""

    contrastive = True

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        return nt_xent(out[self.inputs[0]], out[self.inputs[1]], self.temperature, ids)


class ITC(_ImageText):
    """Cross-modal, data-level: CLIP image-text contrast (Radford et al. 2021) between the first image view
    and the report, learnable temperature, negatives from the global batch; multi-positive by identity
    (UniCL, Yang et al. 2022); ``loss.itc.kind=sigmoid``: SigLIP (Zhai et al. 2023)."""

    name = "itc"
    inputs = ("image_emb", "text_emb")


class ITCFeature(_ImageText):
    """Cross-modal, feature-level: the same contrast between the feature-perturbed passes: the image through
    the encoder with patch dropout (FLIP, Li et al. 2023) or stochastic depth, the report through the encoder
    with fresh dropout (SimCSE's noise, Gao et al. 2021). ``loss.feature_perturbation=pooled_dropout``:
    dropout on the pooled vectors instead (the earlier variant)."""

    name = "itc_feature"
    inputs = ("image_emb_feat", "text_emb_feat")


class ImageSSL(_TwoViews):
    """Uni-modal image, data-level: SLIP (Mu et al. 2022) / SimCLR NT-Xent between two medical-augmented
    views through the image SSL projection head, fixed temperature, gathered negatives."""

    name = "image_ssl"
    inputs = ("image_ssl_1", "image_ssl_2")


class ImageFeature(_TwoViews):
    """Uni-modal image, feature-level: NT-Xent between the clean pass of view 1 and its perturbed pass (patch
    dropout as FLIP, or stochastic depth) through the image SSL head: masked-token consistency."""

    name = "image_feature"
    inputs = ("image_feature_1", "image_feature_2")


class TextSSL(_TwoViews):
    """Uni-modal text, data-level: NT-Xent between the report and its augmented copy (sentence shuffle /
    drop, span masking: the loader's second text view). ``loss.text_ssl_space``: in the text SSL head's own
    space (default, as SLIP does for images: instance discrimination there leaves the shared space to ITC) or
    in the shared image-text space (the alternative, kept for comparison)."""

    name = "text_ssl"
    inputs = ("text_ssl_1", "text_ssl_2")


class TextFeature(_TwoViews):
    """Uni-modal text, feature-level: SimCSE (Gao et al. 2021): two passes of the same report through the
    text encoder with dropout active in every layer, contrasted in the text SSL head's own space."""

    name = "text_feature"
    inputs = ("text_feature_1", "text_feature_2")


class MLM(Term):
    """Fused, data-level: image-conditioned masked language modelling (M3AE, Chen et al. 2022; PMC-CLIP):
    the masked report's token states attend to the image tokens in the fusion encoder and an (untied) MLM
    head predicts the masked tokens. Normalised by the *global* number of masked tokens so the mean over
    ranks equals the single-process token-mean."""

    name = "mlm"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        fused = model.fuse(out["mlm_tokens"], out["text_mask"], out["image_tokens"])
        labels = batch["mlm_labels"].to(fused.device)
        selected = labels != -100
        logits = at_least_fp32(model.mlm_head(fused[selected]))
        loss_sum = F.cross_entropy(logits, labels[selected], reduction="sum")
        _, world_size = world()
        count = global_sum(selected.sum().to(logits.dtype))
        return loss_sum * world_size / count.clamp(min=1.0)


class ITM(Term):
    """Fused, feature-level: ALBEF / BLIP image-text matching with hard negatives. Per image one negative
    text and per text one negative image are sampled from the *gathered* similarity matrix
    (∝ softmax(sim * logit_scale); see ``hard_negatives``), identically on every rank for a given
    (seed, step), never the own pair nor a same-identity sample. Only the sampled negatives' token states
    travel between ranks (an autograd all-to-all), and no tower is re-run. Binary CE over n positives and up
    to 2n negatives per rank, normalised by the global count; a row with no valid negative (every sample of
    the batch shares its identity) is dropped and counted (``itm_dropped_rows``)."""

    name = "itm"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        image_emb, text_emb = at_least_fp32(out["image_emb"]), at_least_fp32(out["text_emb"])
        rank, world_size = world()
        n = image_emb.shape[0]
        with torch.no_grad():
            scale = out["logit_scale"].to(image_emb.dtype).reshape(())
            excluded = positive_mask(ids, n, image_emb.device)
            i2t = scale * image_emb @ all_gather_no_grad(text_emb).T
            t2i = scale * text_emb @ all_gather_no_grad(image_emb).T
            neg_text, valid_text = sample_hard_negatives(i2t, excluded, rank * n, self.seed, step, stream=0)
            neg_image, valid_image = sample_hard_negatives(t2i, excluded, rank * n, self.seed, step, stream=1)
        text_tokens, text_mask = _pad_tokens(out["text_tokens"], out["text_mask"])
        fused = model.fuse(
            torch.cat([text_tokens, exchange_rows(text_tokens, neg_text), text_tokens]),
            torch.cat([text_mask, exchange_rows(text_mask, neg_text), text_mask]),
            torch.cat([out["image_tokens"], out["image_tokens"], exchange_rows(out["image_tokens"], neg_image)]),
        )
        logits = at_least_fp32(model.itm_head(fused[:, 0]))
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
        keep = torch.cat([torch.ones_like(valid_text), valid_text, valid_image]).to(logits.dtype)
        loss_sum = (F.cross_entropy(logits, labels, reduction="none") * keep).sum()
        count = global_sum(keep.sum())
        dropped = global_sum((2 * n - keep[n:].sum()).reshape(()))
        return {self.name: loss_sum * world_size / count.clamp(min=1.0), "itm_dropped_rows": dropped}


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token states and mask to the longest text over ranks, so rows can move between ranks."""
    length = global_max(tokens.shape[1])
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


TERMS: dict[str, type[Term]] = {
    t.name: t for t in (ITC, ITCFeature, ImageSSL, ImageFeature, TextSSL, TextFeature, MLM, ITM)
}
