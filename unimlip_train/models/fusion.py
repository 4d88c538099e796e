"""Fusion encoder for the fused-modality terms (MLM, ITM): text tokens attend to image tokens."""
from __future__ import annotations

import torch
from torch import nn


class FusionLayer(nn.Module):
    """Pre-norm transformer layer: text self-attention, cross-attention to image tokens, MLP (ALBEF-style)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, text: torch.Tensor, pad: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(text)
        text = text + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.norm_cross(text)
        text = text + self.cross_attn(h, image, image, need_weights=False)[0]
        return text + self.mlp(self.norm_mlp(text))


class FusionEncoder(nn.Module):
    """``forward(text_tokens B x L x Ht, text_mask B x L, image_tokens B x T x Hi) -> B x L x Ht``.

    Image tokens are projected to the text width; ``layers`` cross-attention layers of ``heads`` heads.
    ``image_dim`` may list several widths (``model.fusion.image_stages``): ``image_tokens`` is then a tuple of
    token groups (the final map first), each projected by its own Linear + LayerNorm, and the text attends to
    all of them together.
    """

    def __init__(self, text_dim: int, image_dim, layers: int, heads: int):
        super().__init__()
        if text_dim % heads:
            raise ValueError(f"model.fusion.heads={heads} must divide the text tower width {text_dim}")
        dims = (image_dim,) if isinstance(image_dim, int) else tuple(image_dim)
        self.image_proj = nn.Sequential(nn.Linear(dims[0], text_dim), nn.LayerNorm(text_dim))
        if len(dims) > 1:
            self.stage_proj = nn.ModuleList(nn.Sequential(nn.Linear(d, text_dim), nn.LayerNorm(text_dim))
                                            for d in dims[1:])
        self.layers = nn.ModuleList(FusionLayer(text_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image) -> torch.Tensor:
        if isinstance(image, (tuple, list)):
            projections = [self.image_proj, *getattr(self, "stage_proj", [])]
            if len(image) != len(projections):
                raise ValueError(f"{len(image)} groups of image tokens for a fusion encoder built for {len(projections)} "
                                 "(model.fusion.image_stages)")
            image = torch.cat([proj(t.to(text.dtype)) for proj, t in zip(projections, image)], dim=1)
        else:
            image = self.image_proj(image.to(text.dtype))
        pad = text_mask == 0
        for layer in self.layers:
            text = layer(text, pad, image)
        return self.norm(text)
