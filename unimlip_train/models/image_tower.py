"""Image tower: any timm model by name, returning a pooled feature and its token states."""
from __future__ import annotations

import os
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
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


class FeaturePerturbation:
    """The feature-level image perturbation *inside* the encoder, switched on for one pass only.

    ViTs (a timm ``patch_drop`` slot): random patch-token dropout before the blocks, as FLIP (Li et al. 2023),
    which also makes the perturbed pass cheaper. CNNs: spatial dropout (Tompson et al. 2015: whole channels
    zeroed) of every intermediate stage output that timm's ``feature_info`` lists. Not stochastic depth:
    timm's ResNets zero-initialise each residual branch's last norm, so dropping branches changes nothing
    until training has moved them. Outside ``active(True)`` nothing is perturbed.
    """

    def __init__(self, model: nn.Module, token_drop: float, spatial_drop: float):
        self.on = False
        self.patch_drop = None
        if hasattr(model, "patch_drop"):
            self.kind = "patch dropout"
            if token_drop > 0:
                model.patch_drop = self.patch_drop = PatchDropout(
                    token_drop, num_prefix_tokens=getattr(model, "num_prefix_tokens", 1))
                self.rate = token_drop
                self.patch_drop.prob = 0.0
        else:
            self.kind = "spatial dropout"
            self.rate = spatial_drop
            stages = [info["module"] for info in getattr(model, "feature_info", [])][:-1]
            modules = dict(model.named_modules())
            self.hooked = [modules[name].register_forward_hook(self._spatial_dropout)
                           for name in stages if spatial_drop > 0 and name in modules]

    @property
    def available(self) -> bool:
        return self.patch_drop is not None or bool(getattr(self, "hooked", []))

    def _spatial_dropout(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(output, self.rate, training=True) if self.on and output.dim() == 4 else output

    @contextmanager
    def active(self, on: bool):
        self.on = on
        if self.patch_drop is not None:
            self.patch_drop.prob = self.rate if on else 0.0
        try:
            yield
        finally:
            self.on = False
            if self.patch_drop is not None:
                self.patch_drop.prob = 0.0


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
        self.perturbation = FeaturePerturbation(self.model, icfg.token_drop, icfg.spatial_drop)
        # CNN towers on CUDA take NHWC inputs: cuDNN's tensor-core convolutions run channels_last natively.
        self.channels_last = torch.cuda.is_available() and self.perturbation.kind == "spatial dropout"

    def forward(self, x: torch.Tensor, perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``perturb``: this pass with the feature-level perturbation on (see ``FeaturePerturbation``)."""
        x = x.to(next(self.model.parameters()).dtype)  # bf16/fp16 engines hold low-precision weights
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.perturbation.active(perturb):
            feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats
        return pooled, tokens
