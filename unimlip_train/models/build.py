"""Uni-Mlip model construction and the ZeRO-3-safe training step (model forward + objective in one forward)."""
from __future__ import annotations

from torch import nn

from unimlip_train.config.schema import Config
from unimlip_train.models.unimlip import UniMlip


def build_model(cfg: Config, tokenizer, weights: bool = True) -> UniMlip:
    """The Uni-Mlip model for ``cfg`` (towers from ``cfg.model``, heads for the terms enabled in ``cfg.loss``).
    ``weights=False`` loads no pretrained weights (the towers' configs only): the parameter shapes, e.g. built
    on the meta device to check a checkpoint before a run starts."""
    return UniMlip(cfg, tokenizer, weights)


class TrainStep(nn.Module):
    """What the engine wraps: ``forward(batch, step, cache=None) -> (total_loss, logs)``.

    Model forward and every loss term run inside this one forward, so under ZeRO-3 all parameters (the
    temperature, the fusion encoder and heads included) are gathered when they are used. ``logs`` holds
    detached scalars: ``loss`` (the weighted total), one entry per enabled term (unweighted, named like
    its config key), ``temperature`` (1 / logit_scale), ``logit_scale`` and, for the sigmoid loss,
    ``logit_bias``. ``embed_only=True`` returns instead the micro batch's entry of an accumulation cache
    (call it under ``torch.no_grad()``); ``cache`` then makes the contrastive terms score the whole
    optimizer step's batch (see ``losses.objective``).
    """

    def __init__(self, model: UniMlip, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict, step: int, cache=None, embed_only: bool = False):
        if embed_only:
            return self.objective.cache_entry(batch, self.model(batch, contrastive_only=True))
        outputs = self.model(batch)
        loss, logs = self.objective(batch, outputs, self.model, step, cache)
        scale = outputs["logit_scale"].detach()
        logs.update(temperature=1.0 / scale, logit_scale=scale)
        if "logit_bias" in outputs:
            logs["logit_bias"] = outputs["logit_bias"].detach()
        return loss, logs
