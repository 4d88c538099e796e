"""Text tower: a Hugging Face encoder by name / local folder, or a random-init BERT from YAML."""
from __future__ import annotations

import re

import torch
from transformers import BertConfig, BertModel

from unimlip_train.config.schema import Config
from unimlip_train.models.locking import LockableTower
from unimlip_train.models.pretrained import load_text_model

_LAYER = re.compile(r"\.layers?\.(\d+)\.")


class TextTower(LockableTower):
    """``forward(input_ids, attention_mask) -> (pooled B x H, tokens B x L x H)``.

    ``cfg.model.text.name`` set: ``AutoModel.from_pretrained(name, **cfg.model.text.config)`` (a hub id in
    the cache or a local folder; ``config`` then overrides fields). ``model.text.dropout`` sets the encoder's
    own dropout in every layer: the noise SimCSE's feature-level term contrasts.
    Empty: ``BertConfig(**cfg.model.text.config)`` with vocabulary size and pad id from the tokenizer,
    randomly initialised (CPU tests, from-scratch runs). Pooling is the first token (``cls``) or the
    attention-masked mean (``mean``), which also leaves out [MASK] tokens: a masked position holds no word of
    the report, and one shared [MASK] vector in 15 % of the positions of an MLM-masked view (``loss.mlm_view=
    augmented``) moved text_ssl's second view far from its report (NT-Xent at init 3.15 instead of 1.26 against
    ln 31 = 3.43, issue 21). ``model.text.lock`` freezes the encoder except its last
    ``lock_unlocked_groups`` layers (open_clip's ``lock_text_unlocked_layers``).
    """

    def __init__(self, cfg: Config, tokenizer, weights: bool = True):
        super().__init__()
        tcfg = cfg.model.text
        # model.text.dropout in every layer (BERT-family names); an explicit model.text.config entry wins.
        options = {"hidden_dropout_prob": tcfg.dropout, "attention_probs_dropout_prob": tcfg.dropout, **tcfg.config}
        options.setdefault("attn_implementation", "sdpa")  # fused attention kernels (flash / memory-efficient)
        if tcfg.name:
            self.model = load_text_model(tcfg.name, options, weights)
        else:
            config = BertConfig(**{**options, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
            self.model = BertModel(config, add_pooling_layer=False)
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but text tower {tcfg.name or 'BertConfig'} embeds only {vocab}"
            )
        self.pooling = tcfg.pooling
        self.mask_token_id = tokenizer.mask_token_id  # None: nothing to leave out of mean pooling
        self.hidden_size = self.model.config.hidden_size
        if cfg.model.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tcfg.lock:
            self.lock(tcfg.lock_unlocked_groups, "model.text.lock_unlocked_groups")

    def layer_ids(self) -> dict[str, int]:
        """Embeddings 0, encoder layer i at i + 1; anything else (pooler, final norm) joins the top layer."""
        top = self.model.config.num_hidden_layers
        ids = {}
        for name, _ in self.named_parameters():
            layer = _LAYER.search(name)
            ids[name] = int(layer.group(1)) + 1 if layer else 0 if "embeddings" in name else top
        return ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return tokens[:, 0], tokens
        keep = attention_mask if self.mask_token_id is None else attention_mask * (input_ids != self.mask_token_id)
        weights = keep.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0), tokens
