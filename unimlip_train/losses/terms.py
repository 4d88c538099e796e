"""The eight Uni-Mlip loss terms: scope (cross / image / text / fused) x level (data / feature).

Each term is a small module called with the batch, the model outputs (see ``UniMlip.forward``), the model
itself (fused terms run its fusion encoder and heads inside the training forward, so ZeRO-3 gathers their
parameters) and the step (seeds ITM's negative sampling). It returns its unweighted scalar value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unimlip_train.losses.contrastive import at_least_fp32, contrastive_loss, nt_xent
from unimlip_train.losses.gather import all_gather_no_grad, all_gather_with_grad, global_max, global_sum, world
from unimlip_train.losses.hard_negatives import sample_hard_negatives


class Term(nn.Module):
    """Base: a named loss term with its fixed temperature (used by the uni-modal NT-Xent terms)."""

    name = ""

    def __init__(self, temperature: float, seed: int = 0):
        super().__init__()
        self.temperature = temperature
        self.seed = seed


class ITC(Term):
    """Cross-modal, data-level: CLIP image-text contrast (Radford et al. 2021), symmetric InfoNCE between
    the first image view and the report, learnable temperature, negatives from the global batch."""

    name = "itc"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"])


class ITCFeature(Term):
    """Cross-modal, feature-level: the same contrast between feature-perturbed embeddings: dropout noise on
    the pooled tower features before the projections (SimCSE-style feature noise, Gao et al. 2021), which
    needs no second tower pass."""

    name = "itc_feature"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return contrastive_loss(out["image_emb_feat"], out["text_emb_feat"], out["logit_scale"])


class ImageSSL(Term):
    """Uni-modal image, data-level: SLIP (Mu et al. 2022) / SimCLR NT-Xent between two medical-augmented
    views through the image SSL projection head, fixed temperature, gathered negatives."""

    name = "image_ssl"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return nt_xent(out["image_ssl_1"], out["image_ssl_2"], self.temperature)


class ImageFeature(Term):
    """Uni-modal image, feature-level: NT-Xent between two dropout-perturbed copies of the pooled image
    feature through the SSL head (SimCSE's dropout-as-augmentation applied to image features)."""

    name = "image_feature"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return nt_xent(out["image_ssl_feat1"], out["image_ssl_feat2"], self.temperature)


class TextSSL(Term):
    """Uni-modal text, data-level: NT-Xent between the report and its augmented copy (sentence shuffle /
    drop, span masking: the loader's second text view), in the shared embedding space."""

    name = "text_ssl"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return nt_xent(out["text_emb"], out["text_view2_emb"], self.temperature)


class TextFeature(Term):
    """Uni-modal text, feature-level: SimCSE (Gao et al. 2021) dropout contrast. Variant: the two dropout
    masks act on the pooled text feature (not inside the encoder), so no second text-tower pass is needed."""

    name = "text_feature"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        return nt_xent(out["text_emb_feat"], out["text_emb_feat2"], self.temperature)


class MLM(Term):
    """Fused, data-level: image-conditioned masked language modelling (M3AE, Chen et al. 2022; PMC-CLIP):
    the masked report's token states attend to the image tokens in the fusion encoder and an (untied) MLM
    head predicts the masked tokens. Normalised by the *global* number of masked tokens so the mean over
    ranks equals the single-process token-mean."""

    name = "mlm"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
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
    (∝ softmax(sim * logit_scale), positive excluded; see ``hard_negatives``), identically on every rank
    for a given (seed, step). Negatives' token states come from an autograd all-gather of the token states
    (text padded to the global max length), so no tower is re-run. Binary CE over n positives and 2n
    negatives per rank."""

    name = "itm"

    def forward(self, batch: dict, out: dict, model: nn.Module, step: int) -> torch.Tensor:
        image_emb, text_emb = at_least_fp32(out["image_emb"]), at_least_fp32(out["text_emb"])
        rank, _ = world()
        n = image_emb.shape[0]
        with torch.no_grad():
            scale = out["logit_scale"].to(image_emb.dtype).reshape(())
            i2t = scale * image_emb @ all_gather_no_grad(text_emb).T
            t2i = scale * text_emb @ all_gather_no_grad(image_emb).T
            neg_text = sample_hard_negatives(i2t, rank * n, self.seed, step, stream=0)
            neg_image = sample_hard_negatives(t2i, rank * n, self.seed, step, stream=1)
        image_tokens = out["image_tokens"]
        text_tokens, text_mask = _pad_tokens(out["text_tokens"], out["text_mask"])
        image_all = all_gather_with_grad(image_tokens)
        text_all = all_gather_with_grad(text_tokens)
        mask_all = all_gather_no_grad(text_mask)
        fused = model.fuse(
            torch.cat([text_tokens, text_all[neg_text], text_tokens]),
            torch.cat([text_mask, mask_all[neg_text], text_mask]),
            torch.cat([image_tokens, image_tokens, image_all[neg_image]]),
        )
        logits = at_least_fp32(model.itm_head(fused[:, 0]))
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token states and mask to the longest text over ranks, so they can be all-gathered."""
    length = global_max(tokens.shape[1], tokens.device)
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


TERMS: dict[str, type[Term]] = {
    t.name: t for t in (ITC, ITCFeature, ImageSSL, ImageFeature, TextSSL, TextFeature, MLM, ITM)
}
