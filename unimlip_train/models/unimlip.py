"""The Uni-Mlip model: two towers, projections to a shared space, SSL heads, temperature, fusion encoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.models.fusion import FusionEncoder
from unimlip_train.models.image_tower import ImageTower
from unimlip_train.models.masking import ViewMasker
from unimlip_train.models.norm_stats import frozen_running_stats
from unimlip_train.models.text_tower import TextTower

#: batch keys each term needs beyond the always-needed image / input_ids / attention_mask
TERM_BATCH_KEYS = {
    "image_ssl": ("image_view2",),
    "text_ssl": ("text_view2_ids", "text_view2_mask"),
    "mlm": ("mlm_input_ids", "mlm_labels"),
}
_BASE_KEYS = ("image", "input_ids", "attention_mask")
_SIGLIP_INIT_SCALE, _SIGLIP_INIT_BIAS = 10.0, -10.0  # Zhai et al. 2023, section 3.2


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised in at least fp32: under bf16 the norm and the logits built from it would lose the small
    differences between embeddings that a contrastive loss lives on."""
    return F.normalize(x.float() if x.element_size() < 4 else x, dim=-1)


def projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: one bias-free matrix (CLIP); ``mlp``: Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


def ssl_head(in_dim: int, out_dim: int) -> nn.Module:
    """SLIP's SSL MLP, with no BatchNorm so a rank's result does not depend on how the batch is split."""
    return nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.GELU(), nn.Linear(2 * in_dim, out_dim))


class UniMlip(nn.Module):
    """Image/text towers, projections, the SSL heads, the learnable temperature and the fused part.

    Heads exist only for enabled terms (``cfg.loss.<term>.weight != 0``): ``image_ssl_head`` for
    image_ssl / image_feature, ``text_ssl_head`` for text_ssl (``loss.text_ssl_space=ssl_head``) and
    text_feature (``loss.text_feature_space=ssl_head``), ``fusion`` for mlm / itm, ``mlm_head`` for mlm,
    ``itm_head`` for itm, ``logit_bias`` for the sigmoid ITC loss.
    ``logit_scale`` is a (1,)-shaped parameter (DeepSpeed cannot broadcast 0-dim parameters) holding
    log(1 / temperature); ``forward`` returns it exponentiated. It is *not* clamped in the forward pass
    (a clamp there zeroes its gradient past the bound, and momentum can carry it further, never to return):
    the trainer clamps the parameter in place after every optimizer step (``clamp_logit_scale_``).
    """

    def __init__(self, cfg: Config, tokenizer, weights: bool = True):
        super().__init__()
        m = cfg.model
        self.terms = frozenset(cfg.loss.enabled())
        loss = cfg.loss
        self.feature_noise, self.image_feature_pair = loss.feature_noise, loss.image_feature_pair
        self.text_ssl_in_head = loss.text_ssl_space == "ssl_head"
        self.text_feature_in_head = loss.text_feature_space == "ssl_head"
        self.mlm_on_augmented = loss.mlm_view == "augmented" and "mlm" in self.terms
        if self.mlm_on_augmented and "text_ssl" not in self.terms:
            raise ValueError("loss.mlm_view=augmented reads text_ssl's pass of the augmented report: turn text_ssl on")
        self.feature_dropout = m.feature_dropout
        self.log_scale_bounds = (0.0, math.log(m.max_logit_scale))
        self.image_tower = ImageTower(cfg, weights)
        self.text_tower = TextTower(cfg, tokenizer, weights)
        image_dim, text_dim = self.image_tower.num_features, self.text_tower.hidden_size
        self.image_proj = projection(m.projection, image_dim, m.embed_dim)
        self.text_proj = projection(m.projection, text_dim, m.embed_dim)
        sigmoid = cfg.loss.itc.kind == "sigmoid"
        init_scale = _SIGLIP_INIT_SCALE if sigmoid else 1.0 / m.init_temperature
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_scale)))
        if sigmoid:
            self.logit_bias = nn.Parameter(torch.full((1,), _SIGLIP_INIT_BIAS))
        if self.terms & {"image_ssl", "image_feature"}:
            self.image_ssl_head = ssl_head(image_dim, m.ssl_embed_dim)
        if ("text_feature" in self.terms and self.text_feature_in_head) or (
                "text_ssl" in self.terms and self.text_ssl_in_head):
            self.text_ssl_head = ssl_head(text_dim, m.ssl_embed_dim)
        if self.mlm_on_augmented:
            self.view_masker = ViewMasker(tokenizer)
        if self.terms & {"mlm", "itm"}:
            self.fusion = FusionEncoder(text_dim, self.image_tower.token_dims, m.fusion.layers, m.fusion.heads)
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

    @torch.no_grad()
    def clamp_logit_scale_(self, clamp) -> None:
        """Keep log(1 / temperature) in [ln 1, ln model.max_logit_scale] after an optimizer step (open_clip);
        ``clamp(param, lo, hi)`` clamps where the optimizer keeps the parameter (``engine.clamp_parameter_``)."""
        clamp(self.logit_scale, *self.log_scale_bounds)

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

    def forward(self, batch: dict, contrastive_only: bool = False) -> dict[str, torch.Tensor]:
        """Every tower pass the enabled terms need, once; every term reads these outputs.

        Passes, in this order (the order the random state is consumed in, so a replayed forward reproduces
        them): image view 1, report (the clean passes: the only ones that update normalisation statistics,
        see ``norm_stats``); image view 2 (image_ssl); augmented report (text_ssl; masked for MLM with
        ``loss.mlm_view=augmented``); the feature-level passes (``loss.feature_noise=encoder``: view 1 again
        with patch / spatial dropout, twice with ``loss.image_feature_pair=two_noised``, and the report again
        with the encoder's dropout); the masked report (mlm with ``loss.mlm_view=report``), skipped when
        ``contrastive_only``.

        Keys (``*`` only when its term is on): image_emb, text_emb (normalised, view 1), logit_scale (0-dim,
        exp'd), logit_bias (sigmoid ITC), image_tokens, text_tokens, text_mask; image_emb_feat, text_emb_feat
        (itc_feature*); image_feature_1/2, text_feature_1/2 (image_feature*, text_feature*: the two sides
        each feature-level NT-Xent contrasts); image_ssl_1, image_ssl_2 (image_ssl*); text_ssl_1,
        text_ssl_2 (text_ssl*: report and augmented report, in the text SSL head's space or the shared one);
        mlm_tokens, mlm_mask, mlm_labels (mlm*: token states of the masked report, its attention mask and
        targets).
        """
        self.check_batch(batch)
        terms = self.terms
        image_pooled, image_tokens = self.image_tower(batch["image"])
        text_pooled, text_tokens = self.text_tower(batch["input_ids"], batch["attention_mask"])
        out = {
            "image_emb": _unit(self.image_proj(image_pooled)),
            "text_emb": _unit(self.text_proj(text_pooled)),
            "logit_scale": self.logit_scale.exp().reshape(()),
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "text_mask": batch["attention_mask"],
        }
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias.reshape(())
        mlm = "mlm" in terms and not contrastive_only
        with frozen_running_stats(self.image_tower, self.text_tower):
            image_ssl_1 = _unit(self.image_ssl_head(image_pooled)) if terms & {"image_ssl", "image_feature"} else None
            if "image_ssl" in terms:
                view2_pooled, _ = self.image_tower(batch["image_view2"])
                out["image_ssl_1"], out["image_ssl_2"] = image_ssl_1, _unit(self.image_ssl_head(view2_pooled))
            if "text_ssl" in terms:
                out.update(self._augmented_report(batch, out, text_pooled, mlm))
            if terms & {"itc_feature", "image_feature", "text_feature"}:
                out.update(self._feature_outputs(batch, image_pooled, text_pooled, image_ssl_1))
            if mlm and not self.mlm_on_augmented:
                out["mlm_tokens"] = self.text_tower(batch["mlm_input_ids"], batch["attention_mask"])[1]
                out["mlm_mask"], out["mlm_labels"] = batch["attention_mask"], batch["mlm_labels"]
        return out

    def _augmented_report(self, batch: dict, out: dict, text_pooled: torch.Tensor, mlm: bool) -> dict:
        """text_ssl's second view; with ``loss.mlm_view=augmented`` that view is also masked (the loader's MLM
        positions, see ``mask_like``) and its token states are MLM's input, so the masked report needs no pass of
        its own. text_ssl then contrasts the report with the augmented *and masked* report in both cases, so
        the caching pass of accumulated negatives and its replay see the same view."""
        ids, mask, res = batch["text_view2_ids"], batch["text_view2_mask"], {}
        if self.mlm_on_augmented:
            ids, labels = self.view_masker(ids, batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"])
        pooled, tokens = self.text_tower(ids, mask)
        if self.text_ssl_in_head:
            res["text_ssl_1"], res["text_ssl_2"] = _unit(self.text_ssl_head(text_pooled)), _unit(self.text_ssl_head(pooled))
        else:
            res["text_ssl_1"], res["text_ssl_2"] = out["text_emb"], _unit(self.text_proj(pooled))
        if mlm and self.mlm_on_augmented:
            res["mlm_tokens"], res["mlm_mask"], res["mlm_labels"] = tokens, mask, labels
        return res

    def _noised_image(self, batch: dict, image_pooled: torch.Tensor) -> torch.Tensor:
        """One noised copy of view 1's pooled feature: a tower pass with patch / spatial dropout inside
        (``loss.feature_noise=encoder``, FLIP) or dropout on the clean pooled vector (``pooled_dropout``)."""
        if self.feature_noise == "encoder":
            return self.image_tower(batch["image"], perturb=True)[0]
        return self._drop(image_pooled)

    def _feature_outputs(self, batch: dict, image_pooled, text_pooled, image_ssl_1) -> dict:
        """The feature-level terms' inputs; each choice is its own key (issue 21).

        ``loss.feature_noise``: ``encoder`` perturbs inside the encoders (image: patch dropout, FLIP, or spatial
        dropout of CNN stages; text: a second pass with the encoder's own dropout in every layer, SimCSE);
        ``pooled_dropout`` drops units of the pooled vectors of the clean passes (no extra tower pass; its
        two "views" start nearly identical, so it acts mostly as a uniformity term, see issue 9).
        ``loss.image_feature_pair``: ``clean_noised`` contrasts the clean view 1 with its noised copy,
        ``two_noised`` two independently noised copies. ``loss.text_feature_space``: the text SSL head's space
        or the shared image-text one. The text pair is always two noised copies of the report (SimCSE): under
        ``encoder`` the report pass itself carries the encoder's dropout."""
        terms, out, encoder = self.terms, {}, self.feature_noise == "encoder"
        if terms & {"itc_feature", "image_feature"}:
            image_noised = self._noised_image(batch, image_pooled)
        if terms & {"itc_feature", "text_feature"}:
            text_noised = (self.text_tower(batch["input_ids"], batch["attention_mask"])[0] if encoder
                           else self._drop(text_pooled))
        if "itc_feature" in terms:
            out["image_emb_feat"] = _unit(self.image_proj(image_noised))
            out["text_emb_feat"] = _unit(self.text_proj(text_noised))
        if "image_feature" in terms:
            first = (image_ssl_1 if self.image_feature_pair == "clean_noised"
                     else _unit(self.image_ssl_head(self._noised_image(batch, image_pooled))))
            out["image_feature_1"], out["image_feature_2"] = first, _unit(self.image_ssl_head(image_noised))
        if "text_feature" in terms:
            head = self.text_ssl_head if self.text_feature_in_head else self.text_proj
            first = text_pooled if encoder else self._drop(text_pooled)
            out["text_feature_1"], out["text_feature_2"] = _unit(head(first)), _unit(head(text_noised))
        return out
