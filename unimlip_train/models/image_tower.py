"""Image tower: any timm model by name, returning a pooled feature and its token states."""
from __future__ import annotations

import timm
import torch

from unimlip_train.config import Config
from unimlip_train.models.locking import LockableTower
from unimlip_train.models.pretrained import explain_missing, image_weights


class ImageTower(LockableTower):
    """Wraps ``timm.create_model(cfg.model.image.name, num_classes=0, in_chans, img_size, **kwargs)``.

    ``forward(x) -> (pooled B x F, tokens B x T x F)``: the model's own pooling (CLS or average) and its
    final feature map as tokens (ViT tokens as they are, CNN maps flattened) for the fusion encoder.
    ``model.image.pretrained`` loads weights (``unimlip_train.models.pretrained``); ``model.image.lock`` freezes
    the tower except its last ``lock_unlocked_groups`` timm layer groups (``group_matcher``, as open_clip).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        icfg = cfg.model.image
        kwargs = dict(num_classes=0, in_chans=cfg.data.in_chans, **icfg.kwargs)
        weights = image_weights(icfg.name, icfg.pretrained) if icfg.pretrained else None
        if weights:
            kwargs.update(weights.create_kwargs())
        with explain_missing("model.image.pretrained", icfg.pretrained, weights.describe() if weights else ""):
            try:
                self.model = timm.create_model(icfg.name, img_size=cfg.data.image_size, **kwargs)
            except TypeError as e:  # convolutional models take any input size and have no img_size argument
                if "img_size" not in str(e):
                    raise
                self.model = timm.create_model(icfg.name, **kwargs)
        self.num_features = self.model.num_features
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if icfg.lock:
            self.lock(icfg.lock_unlocked_groups, "model.image.lock_unlocked_groups")

    def layer_ids(self) -> dict[str, int]:
        """timm's own layer groups (``group_matcher``: stem, then blocks; the final norm joins the last block)."""
        from timm.models import group_parameters

        try:
            matcher = self.model.group_matcher()
        except (AttributeError, NotImplementedError):
            raise ValueError(f"timm model {type(self.model).__name__} defines no layer groups (group_matcher): "
                             "lock it whole (lock_unlocked_groups=0) and leave train.layer_decay at 1") from None
        ids = group_parameters(self.model, matcher, reverse=True)
        return {f"model.{name}": layer for name, layer in ids.items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(next(self.model.parameters()).dtype)  # bf16/fp16 engines hold low-precision weights
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats
        return pooled, tokens
