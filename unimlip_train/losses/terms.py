"""The eight Uni-Mlip loss terms: scope (cross / image / text / fused) x level (data / feature), and an
optional uniformity term (Wang & Isola 2020) outside the matrix.

Each term is a small module called with the batch, the model outputs (see ``UniMlip.forward``), the model
itself (fused terms run its fusion encoder and heads inside the training forward, so ZeRO-3 gathers their
parameters), the step (seeds ITM's negative sampling) and the samples' identities (``ids``: which other
samples carry the same report or group, see ``contrastive``). It returns its unweighted scalar value, or a
dict holding it under the term's name plus extra counters to log.

Contrastive terms (``contrastive = True``) score a batch against negatives gathered from every rank; under
gradient accumulation they receive the outputs of all the optimizer step's micro batches (see
``objective``). MLM and ITM are per micro batch.

Where the terms come from: the Uni-Mlip paper (Bawazir, Wu, Li, BMVC 2024) names the cells of its matrix (cross-,
uni-, fused-modality x data-, feature-level) but its full text could not be consulted here, so each cell is
the standard published form of its technique, cited in its docstring; where a choice is ours (perturbation,
spaces, negatives, weights), it is a config key and the docstring says which value is default and why.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.losses.contrastive import (
    at_least_fp32,
    contrastive_loss,
    nt_xent,
    positive_mask,
    sigmoid_loss,
    uniformity_loss,
)
from unimlip_train.losses.gather import all_gather_no_grad, exchange_rows, global_max, global_sum, world
from unimlip_train.losses.hard_negatives import gumbel_noise, sample_hard_negatives


class Term(nn.Module):
    """Base: a named loss term; ``inputs`` are the two model outputs a contrastive term contrasts."""

    name = ""
    contrastive = False
    inputs: tuple = ()

    def __init__(self, cfg: Config):
        super().__init__()
        term_cfg = getattr(cfg.loss, self.name)
        self.temperature, self.center = term_cfg.temperature, term_cfg.center
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
    negatives. ``loss.<term>.center``: the embeddings are centred on the mean of the whole optimizer step's
    global batch first (see ``contrastive.nt_xent``)."""

    contrastive = True

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        return nt_xent(out[self.inputs[0]], out[self.inputs[1]], self.temperature, ids, center=self.center)


class ITC(_ImageText):
    """Cross-modal, data-level: CLIP image-text contrast (Radford et al. 2021) between the first image view
    and the report, learnable temperature, negatives from the global batch; multi-positive by identity
    (UniCL, Yang et al. 2022); ``loss.itc.kind=sigmoid``: SigLIP (Zhai et al. 2023)."""

    name = "itc"
    inputs = ("image_emb", "text_emb")


class ITCFeature(_ImageText):
    """Cross-modal, feature-level: the same contrast between the feature-perturbed copies. With
    ``loss.feature_noise=encoder`` (default): the image through the encoder with patch dropout (FLIP, Li et al.
    2023) or, for CNNs, spatial dropout of the stage outputs (Tompson et al. 2015), the report through the
    encoder with fresh dropout (SimCSE's noise, Gao et al. 2021); ``pooled_dropout``: dropout on the pooled
    vectors of the clean passes instead (the earlier variant, no extra pass). The Uni-Mlip paper names the
    cell, not the perturbation: these are the standard published forms."""

    name = "itc_feature"
    inputs = ("image_emb_feat", "text_emb_feat")


class ImageSSL(_TwoViews):
    """Uni-modal image, data-level: SLIP (Mu et al. 2022) / SimCLR (Chen et al. 2020) NT-Xent between two
    medical-augmented views through the image SSL projection head, fixed temperature, gathered negatives."""

    name = "image_ssl"
    inputs = ("image_ssl_1", "image_ssl_2")


class ImageFeature(_TwoViews):
    """Uni-modal image, feature-level: NT-Xent (SimCLR) through the image SSL head between view 1 and a
    noised copy of it: ``loss.image_feature_pair=clean_noised`` (default: the clean pass against the
    perturbed one, masked-token consistency as in FLIP-style patch dropout) or ``two_noised`` (two independent
    noise draws, SimCSE's recipe applied to images). Where the noise goes is ``loss.feature_noise``; with
    ``pooled_dropout`` and ``two_noised`` the two sides start nearly identical and the term acts mostly as a
    uniformity term on the image tower (Wang & Isola 2020), which is what lifted retrieval in issue 21."""

    name = "image_feature"
    inputs = ("image_feature_1", "image_feature_2")


class TextSSL(_TwoViews):
    """Uni-modal text, data-level: NT-Xent (SimCLR; SLIP's recipe carried to text, as in DeCLUTR / CLEAR)
    between the report and its augmented copy (sentence shuffle / drop, span masking: the loader's second
    text view; with ``loss.mlm_view=augmented`` also MLM-masked). ``loss.text_ssl_space``: in the text SSL
    head's own space (default, as SLIP does for images: instance discrimination there leaves the shared space
    to ITC) or in the shared image-text space (the alternative, kept for comparison)."""

    name = "text_ssl"
    inputs = ("text_ssl_1", "text_ssl_2")


class TextFeature(_TwoViews):
    """Uni-modal text, feature-level: SimCSE (Gao et al. 2021): two noised copies of the same report, with
    ``loss.feature_noise=encoder`` two passes through the text encoder with dropout active in every layer
    (SimCSE exactly), with ``pooled_dropout`` two dropout masks on the pooled vector. Contrasted in the text
    SSL head's own space (``loss.text_feature_space=ssl_head``, default: the shared space must keep duplicate
    reports together) or in the shared image-text space (``shared``)."""

    name = "text_feature"
    inputs = ("text_feature_1", "text_feature_2")


class MLM(Term):
    """Fused, data-level: image-conditioned masked language modelling (M3AE, Chen et al. 2022; PMC-CLIP):
    the masked report's token states attend to the image tokens in the fusion encoder and an (untied) MLM
    head predicts the masked tokens. Normalised by the *global* number of masked tokens so the mean over
    ranks equals the single-process token-mean. ``loss.mlm_view``: the masked report is the augmented report
    (default: text_ssl's pass of it, masked at the same positions, one text pass fewer, see
    ``models.masking``) or the report (its own text pass, as M3AE)."""

    name = "mlm"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        fused = model.fuse(out["mlm_tokens"], out["mlm_mask"], out["image_tokens"])
        labels = out["mlm_labels"].to(fused.device)
        selected = labels != -100
        logits = at_least_fp32(model.mlm_head(fused[selected]))
        loss_sum = F.cross_entropy(logits, labels[selected], reduction="sum")
        _, world_size = world()
        count = global_sum(selected.sum().to(logits.dtype))
        return loss_sum * world_size / count.clamp(min=1.0)


class ITM(Term):
    """Fused, feature-level: ALBEF (Li et al. 2021) / BLIP (Li et al. 2022) image-text matching with hard
    negatives: a binary match / no-match head on the fusion encoder's [CLS] state. Per image one negative
    text and per text one negative image are sampled from the *gathered* similarity matrix
    (∝ softmax(sim * logit_scale); see ``hard_negatives``), identically on every rank for a given
    (seed, step), never the own pair nor a same-identity sample. Only the sampled negatives' token states
    travel between ranks (an autograd all-to-all), and no tower is re-run. Binary CE over the n positives and
    the negatives, normalised by the global count; a row with no valid negative (every sample of the batch
    shares its identity) is dropped and counted (``itm_dropped_rows``). ``itm_acc`` is the accuracy over the
    scored rows (chance: the share of negatives, 2/3 or 1/2).

    ``loss.itm_negatives``: ``image_and_text`` (ALBEF / BLIP: both negatives of every pair, 3n fused rows,
    labels 1 : 2) or ``one_per_pair`` (default; n fused rows fewer, labels 1 : 1: global row g takes its
    hard-negative text when g + step is even and its hard-negative image otherwise, so each kind is half the
    negatives and a sample alternates between them from step to step).

    ``loss.itm_hardness`` = beta: negatives are drawn ∝ exp(beta * logit_scale * sim), the concentration
    parameter of Robinson et al. (2021, "Contrastive learning with hard negative samples"): 1 is ALBEF's
    hardness (default), 0 draws uniformly among the allowed samples. Why a knob: on near-identical
    radiographs the hardest texts are mostly reports of the same findings in other words, false negatives no
    identity rule catches, and ITM then stays at its label prior (issue 21: 0.636 for 300 steps at beta 1;
    it learns at beta 0). ``loss.itm_fraction`` = f < 1: only a seeded sample of round(f * N) of the global
    batch's N pairs is scored, each with its negatives (fused rows scale with f; the sample is the same
    however the batch is split over ranks)."""

    name = "itm"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.one_per_pair = cfg.loss.itm_negatives == "one_per_pair"
        self.hardness, self.fraction = cfg.loss.itm_hardness, cfg.loss.itm_fraction

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        image_emb, text_emb = at_least_fp32(out["image_emb"]), at_least_fp32(out["text_emb"])
        rank, world_size = world()
        n = image_emb.shape[0]
        with torch.no_grad():
            scale = self.hardness * out["logit_scale"].to(image_emb.dtype).reshape(())
            excluded = positive_mask(ids, n, image_emb.device)
            i2t = scale * image_emb @ all_gather_no_grad(text_emb).T
            t2i = scale * text_emb @ all_gather_no_grad(image_emb).T
            neg_text, valid_text = sample_hard_negatives(i2t, excluded, rank * n, self.seed, step, stream=0)
            neg_image, valid_image = sample_hard_negatives(t2i, excluded, rank * n, self.seed, step, stream=1)
        text_tokens, text_mask = _pad_tokens(out["text_tokens"], out["text_mask"])
        image_tokens = out["image_tokens"]  # a tensor, or a tuple of token groups (model.fusion.image_stages)
        other_text, other_mask = exchange_rows(text_tokens, neg_text), exchange_rows(text_mask, neg_text)
        other_image = _each(lambda t: exchange_rows(t, neg_image), image_tokens)
        # (text, mask, image, valid) of the positive, then of each negative kind, one row per local pair
        rows = [(text_tokens, text_mask, image_tokens, torch.ones_like(valid_text))]
        if self.one_per_pair:
            use_text = (torch.arange(n, device=image_emb.device) + rank * n + step) % 2 == 0
            rows.append((torch.where(use_text[:, None, None], other_text, text_tokens),
                         torch.where(use_text[:, None], other_mask, text_mask),
                         _each(lambda own, other: torch.where(use_text[:, None, None], own, other), image_tokens,
                               other_image),
                         torch.where(use_text, valid_text, valid_image)))
        else:
            rows += [(other_text, other_mask, image_tokens, valid_text), (text_tokens, text_mask, other_image, valid_image)]
        scored = n
        if self.fraction < 1.0:
            picked = self._sampled_pairs(n, rank, world_size, step, image_emb.device)
            scored = picked.numel()  # a host read (nonzero), like the all-to-all's split sizes
            if scored == 0:  # this rank scores no pair: one row at weight 0, so every rank runs the fusion encoder
                picked = picked.new_zeros(1)
            rows = [tuple(_each(lambda t: t[picked], t) for t in kind[:3]) + (kind[3][picked] & (scored > 0),)
                    for kind in rows]
        fused = model.fuse(*(_each(lambda *parts: torch.cat(parts), *(kind[i] for kind in rows)) for i in range(3)))
        logits = at_least_fp32(model.itm_head(fused[:, 0]))
        m = rows[0][0].shape[0]
        labels = torch.cat([torch.ones(m), torch.zeros(m * (len(rows) - 1))]).long().to(logits.device)
        keep = torch.cat([kind[3] for kind in rows]).to(logits.dtype)
        loss_sum = (F.cross_entropy(logits, labels, reduction="none") * keep).sum()
        count = global_sum(keep.sum())
        correct = global_sum(((logits.detach().argmax(1) == labels).to(keep.dtype) * keep).sum())
        dropped = global_sum((min(m, scored) * (len(rows) - 1) - keep[m:].sum()).reshape(()))
        return {self.name: loss_sum * world_size / count.clamp(min=1.0), "itm_dropped_rows": dropped,
                "itm_acc": correct / count.clamp(min=1.0)}

    def _sampled_pairs(self, n: int, rank: int, world_size: int, step: int, device) -> torch.Tensor:
        """Local indices of the pairs ITM scores this step with ``loss.itm_fraction`` < 1: the round(f * N)
        global pairs with the largest hashed keys of (seed, step, global row), computed by every rank for all N
        rows without communication, so the sample does not depend on how the batch is split."""
        total = n * world_size
        keys = gumbel_noise(self.seed, step, 2, torch.arange(total, device=device), 1)[:, 0]
        chosen = torch.zeros(total, dtype=torch.bool, device=device)
        chosen[keys.topk(max(1, round(self.fraction * total))).indices] = True
        return chosen[rank * n:(rank + 1) * n].nonzero().flatten()


class Uniformity(Term):
    """Not one of Uni-Mlip's eight cells: the uniformity loss of Wang & Isola (2020, "Understanding
    contrastive representation learning through alignment and uniformity on the hypersphere"),
    log E exp(-2 ||x - y||^2) over pairs of distinct samples of the whole optimizer step's global batch, for
    the image and the report embeddings of the shared space (their mean). Off by default (weight 0): the
    explicit push-apart component that issue 21 found to be what the pooled image-feature term contributed
    on near-identical radiographs, available on its own. Same-identity pairs are not pushed apart."""

    name = "uniformity"
    contrastive = True
    inputs = ("image_emb", "text_emb")

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int, ids: Optional[torch.Tensor]):
        return (uniformity_loss(out["image_emb"], ids) + uniformity_loss(out["text_emb"], ids)) / 2


def _each(fn, *tokens):
    """``fn`` over token tensors, or over each group of tuples of token groups (zipped)."""
    if isinstance(tokens[0], tuple):
        return tuple(fn(*group) for group in zip(*tokens))
    return fn(*tokens)


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token states and mask to the longest text over ranks, so rows can move between ranks."""
    length = global_max(tokens.shape[1])
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


TERMS: dict[str, type[Term]] = {
    t.name: t for t in (ITC, ITCFeature, ImageSSL, ImageFeature, TextSSL, TextFeature, MLM, ITM, Uniformity)
}
