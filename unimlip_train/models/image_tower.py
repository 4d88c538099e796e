"""Image tower: any timm model by name, returning a pooled feature and its token states."""
from __future__ import annotations

import os

import timm
import torch
from torch import nn

from unimlip_train.config import Config

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


def resolve_weights(path: str) -> str:
    """A local weights file, or the first known weights file inside a folder (never a hub download)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"model.image.pretrained: no weights file ({', '.join(_WEIGHT_FILES)}) in {path}")
    raise FileNotFoundError(f"model.image.pretrained: {path} is neither a file nor a folder")


class ImageTower(nn.Module):
    """Wraps ``timm.create_model(cfg.model.image.name, num_classes=0, in_chans, img_size, **kwargs)``.

    ``forward(x) -> (pooled B x F, tokens B x T x F)``: the model's own pooling (CLS or average) and its
    final feature map as tokens (ViT tokens as they are, CNN maps flattened) for the fusion encoder.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        icfg = cfg.model.image
        kwargs = dict(num_classes=0, in_chans=cfg.data.in_chans, **icfg.kwargs)
        if icfg.pretrained:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": resolve_weights(icfg.pretrained)})
        try:
            self.model = timm.create_model(icfg.name, img_size=cfg.data.image_size, **kwargs)
        except TypeError as e:  # convolutional models take any input size and have no img_size argument
            if "img_size" not in str(e):
                raise
            self.model = timm.create_model(icfg.name, **kwargs)
        self.num_features = self.model.num_features
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(next(self.model.parameters()).dtype)  # bf16/fp16 engines hold low-precision weights
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats
        return pooled, tokens
