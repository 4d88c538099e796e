"""Uni-Mlip model construction and the ZeRO-3-safe training step (model forward + objective in one forward)."""
from __future__ import annotations

import torch
from torch import nn

from unimlip_train.config import Config
from unimlip_train.models.unimlip import UniMlip


def build_model(cfg: Config, tokenizer) -> UniMlip:
    """The Uni-Mlip model for ``cfg`` (towers from ``cfg.model``, heads for the terms enabled in ``cfg.loss``)."""
    return UniMlip(cfg, tokenizer)


class TrainStep(nn.Module):
    """What the engine wraps: ``forward(batch, step) -> (total_loss, logs)``.

    Model forward and every loss term run inside this one forward, so under ZeRO-3 all parameters (the
    temperature, the fusion encoder and heads included) are gathered when they are used. ``logs`` holds
    detached scalars: ``loss`` (the weighted total), one entry per enabled term (unweighted, named like
    its config key) and ``temperature`` (1 / logit_scale).
    """

    def __init__(self, model: UniMlip, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        values = self.objective(batch, outputs, self.model, step)
        logs = {name: value.detach() for name, value in values.items()}
        logs["temperature"] = 1.0 / outputs["logit_scale"].detach()
        return values["loss"], logs
