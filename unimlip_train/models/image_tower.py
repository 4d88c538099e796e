"""Image tower: any timm model by name, returning a pooled feature and its token states."""
from __future__ import annotations

from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.models.locking import LockableTower
from unimlip_train.models.pretrained import explain_missing, image_weights


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
        """The perturbation for this pass, whatever mode the tower is in: a locked tower stays in eval mode,
        but its feature-level pass must still differ from the ordinary one."""
        self.on = on
        if self.patch_drop is not None:
            self.patch_drop.prob, self.patch_drop.training = (self.rate, True) if on else (0.0, False)
        try:
            yield
        finally:
            self.on = False
            if self.patch_drop is not None:
                self.patch_drop.prob, self.patch_drop.training = 0.0, False


class ImageTower(LockableTower):
    """Wraps ``timm.create_model(cfg.model.image.name, num_classes=0, in_chans, img_size, **kwargs)``.

    ``forward(x) -> (pooled B x F, tokens B x T x F)``: the model's own pooling (CLS or average) and its
    final feature map as tokens (ViT tokens as they are, CNN maps flattened) for the fusion encoder. With
    ``model.fusion.image_stages`` = N > 1 (and a fused term on) ``tokens`` is a tuple: the final map's tokens,
    then those of the N - 1 stages before it (timm's ``feature_info``), each at its own width (``token_dims``);
    the fusion encoder projects each group itself, so the tower's parameters and pooled output are unchanged.
    ``model.image.pretrained`` loads weights (``unimlip_train.models.pretrained``; ``weights=False`` builds the
    architecture only); ``model.image.lock`` freezes the tower except its last ``lock_unlocked_groups`` timm layer
    groups (``group_matcher``, as open_clip).
    """

    def __init__(self, cfg: Config, weights: bool = True):
        super().__init__()
        icfg = cfg.model.image
        kwargs = dict(num_classes=0, in_chans=cfg.data.in_chans, **icfg.kwargs)
        source = image_weights(icfg.name, icfg.pretrained) if icfg.pretrained and weights else None
        if source:
            kwargs.update(source.create_kwargs())
        with explain_missing("model.image.pretrained", icfg.pretrained, source.describe() if source else ""):
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
        self.token_dims, self._stage_maps = (self.num_features,), []
        stages = cfg.model.fusion.image_stages if {"mlm", "itm"} & cfg.loss.enabled().keys() else 1
        if stages > 1:
            info = list(getattr(self.model, "feature_info", []))
            if len(info) < stages:
                raise ValueError(f"model.fusion.image_stages={stages}: timm model {icfg.name} lists "
                                 f"{len(info)} feature stages")
            modules = dict(self.model.named_modules())
            for entry in reversed(info[-stages:-1]):
                modules[entry["module"]].register_forward_hook(self._keep_stage_map)
            self.token_dims += tuple(entry["num_chs"] for entry in reversed(info[-stages:-1]))
        # CNN towers on CUDA take NHWC inputs: cuDNN's tensor-core convolutions run channels_last natively.
        self.channels_last = torch.cuda.is_available() and self.perturbation.kind == "spatial dropout"
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

    def _keep_stage_map(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._stage_maps.append(output)

    def forward(self, x: torch.Tensor, perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``perturb``: this pass with the feature-level perturbation on (see ``FeaturePerturbation``)."""
        x = x.to(next(self.model.parameters()).dtype)  # bf16/fp16 engines hold low-precision weights
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._stage_maps = []
        with self.perturbation.active(perturb):
            feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = [_as_tokens(m) for m in (feats, *reversed(self._stage_maps))]
        self._stage_maps = []
        return pooled, tokens[0] if len(tokens) == 1 else tuple(tokens)


def _as_tokens(feats: torch.Tensor) -> torch.Tensor:
    """B x C x H x W maps flattened to B x HW x C; token states (B x T x C) as they are."""
    return feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats
