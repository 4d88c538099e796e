"""The Uni-Mlip model: two towers, projections to a shared space, SSL head, temperature, fusion encoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimlip_train.config import Config
from unimlip_train.models.fusion import FusionEncoder
from unimlip_train.models.image_tower import ImageTower
from unimlip_train.models.text_tower import TextTower

#: batch keys each term needs beyond the always-needed image / input_ids / attention_mask
TERM_BATCH_KEYS = {
    "image_ssl": ("image_view2",),
    "text_ssl": ("text_view2_ids", "text_view2_mask"),
    "mlm": ("mlm_input_ids", "mlm_labels"),
}
_BASE_KEYS = ("image", "input_ids", "attention_mask")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised in fp32: under bf16 the norm and the logits built from it would lose the small
    differences between embeddings that a contrastive loss lives on."""
    return F.normalize(x.float(), dim=-1)


def projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: one bias-free matrix (CLIP); ``mlp``: Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


class UniMlip(nn.Module):
    """Image/text towers, projections, the image SSL head, the learnable temperature and the fused part.

    Heads exist only for enabled terms (``cfg.loss.<term>.weight != 0``): ``image_ssl_head`` for
    image_ssl / image_feature, ``fusion`` for mlm / itm, ``mlm_head`` for mlm, ``itm_head`` for itm.
    ``logit_scale`` is a (1,)-shaped parameter (DeepSpeed cannot broadcast 0-dim parameters) holding
    log(1 / temperature); ``forward`` returns it exponentiated and clamped at ``cfg.model.max_logit_scale``.
    """

    def __init__(self, cfg: Config, tokenizer):
        super().__init__()
        m = cfg.model
        self.terms = frozenset(cfg.loss.enabled())
        self.feature_dropout = m.feature_dropout
        self.max_log_scale = math.log(m.max_logit_scale)
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg, tokenizer)
        image_dim, text_dim = self.image_tower.num_features, self.text_tower.hidden_size
        self.image_proj = projection(m.projection, image_dim, m.embed_dim)
        self.text_proj = projection(m.projection, text_dim, m.embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / m.init_temperature)))
        if self.terms & {"image_ssl", "image_feature"}:
            # SLIP's SSL MLP, with no BatchNorm so a rank's result does not depend on how the batch is split
            self.image_ssl_head = nn.Sequential(
                nn.Linear(image_dim, 2 * image_dim), nn.GELU(), nn.Linear(2 * image_dim, m.ssl_embed_dim)
            )
        if self.terms & {"mlm", "itm"}:
            self.fusion = FusionEncoder(text_dim, image_dim, m.fusion.layers, m.fusion.heads)
        if "mlm" in self.terms:
            self.mlm_head = nn.Sequential(
                nn.Linear(text_dim, text_dim), nn.GELU(), nn.LayerNorm(text_dim), nn.Linear(text_dim, len(tokenizer))
            )
        if "itm" in self.terms:
            self.itm_head = nn.Linear(text_dim, 2)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, B x embed_dim."""
        return _unit(self.image_proj(self.image_tower(image)[0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised report embeddings, B x embed_dim."""
        return _unit(self.text_proj(self.text_tower(input_ids, attention_mask)[0]))

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image-conditioned text token states from the fusion encoder (for the MLM and ITM heads)."""
        return self.fusion(text_tokens, text_mask, image_tokens)

    def check_batch(self, batch: dict) -> None:
        """Fail clearly when an enabled term's input is missing, instead of silently skipping the term."""
        for key in _BASE_KEYS:
            if key not in batch:
                raise KeyError(f"batch has no '{key}' (every Uni-Mlip forward needs {', '.join(_BASE_KEYS)})")
        for term in sorted(self.terms):
            for key in TERM_BATCH_KEYS.get(term, ()):
                if key not in batch:
                    raise KeyError(
                        f"loss term '{term}' is on (loss.{term}.weight != 0) but the batch has no '{key}'; "
                        f"give the loader BatchNeeds for it or set loss.{term}.weight=0"
                    )

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.feature_dropout, self.training)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One tower pass per view; every term reads these outputs. Keys (``*`` only when its term is on):

        image_emb, text_emb (normalised, view 1), logit_scale (0-dim, exp'd, clamped), image_tokens,
        text_tokens, text_mask; image_emb_feat, text_emb_feat (itc_feature / text_feature*: projections of
        a dropout-perturbed pooled feature); text_emb_feat2 (text_feature*: a second dropout copy);
        image_ssl_feat1, image_ssl_feat2 (image_feature*: two dropout copies through the SSL head);
        image_ssl_1, image_ssl_2 (image_ssl*: views 1 and 2 through the SSL head); text_view2_emb
        (text_ssl*); mlm_tokens (mlm*: text token states of ``mlm_input_ids``).
        """
        self.check_batch(batch)
        terms = self.terms
        image_pooled, image_tokens = self.image_tower(batch["image"])
        text_pooled, text_tokens = self.text_tower(batch["input_ids"], batch["attention_mask"])
        out = {
            "image_emb": _unit(self.image_proj(image_pooled)),
            "text_emb": _unit(self.text_proj(text_pooled)),
            "logit_scale": self.logit_scale.clamp(max=self.max_log_scale).exp().reshape(()),
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "text_mask": batch["attention_mask"],
        }
        if terms & {"itc_feature", "image_feature"}:
            image_drop = self._drop(image_pooled)
        if terms & {"itc_feature", "text_feature"}:
            out["text_emb_feat"] = _unit(self.text_proj(self._drop(text_pooled)))
        if "itc_feature" in terms:
            out["image_emb_feat"] = _unit(self.image_proj(image_drop))
        if "text_feature" in terms:
            out["text_emb_feat2"] = _unit(self.text_proj(self._drop(text_pooled)))
        if "image_feature" in terms:
            out["image_ssl_feat1"] = _unit(self.image_ssl_head(image_drop))
            out["image_ssl_feat2"] = _unit(self.image_ssl_head(self._drop(image_pooled)))
        if "image_ssl" in terms:
            view2_pooled, _ = self.image_tower(batch["image_view2"])
            out["image_ssl_1"] = _unit(self.image_ssl_head(image_pooled))
            out["image_ssl_2"] = _unit(self.image_ssl_head(view2_pooled))
        if "text_ssl" in terms:
            view2_pooled, _ = self.text_tower(batch["text_view2_ids"], batch["text_view2_mask"])
            out["text_view2_emb"] = _unit(self.text_proj(view2_pooled))
        if "mlm" in terms:
            out["mlm_tokens"] = self.text_tower(batch["mlm_input_ids"], batch["attention_mask"])[1]
        return out
