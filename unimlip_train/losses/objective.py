"""The Uni-Mlip objective: the weighted sum of the enabled terms, each also reported unweighted."""
from __future__ import annotations

import torch
from torch import nn

from unimlip_train.config import Config
from unimlip_train.losses.terms import TERMS


class UniMlipObjective(nn.Module):
    """Builds every term whose ``cfg.loss.<term>.weight`` is non-zero; ``forward`` returns
    ``{"loss": sum(weight * term), <term name>: unweighted term value (detached), ...}``."""

    def __init__(self, cfg: Config):
        super().__init__()
        enabled = cfg.loss.enabled()
        self.weights = {name: term_cfg.weight for name, term_cfg in enabled.items()}
        self.terms = nn.ModuleDict(
            {name: TERMS[name](term_cfg.temperature, seed=cfg.seed) for name, term_cfg in enabled.items()}
        )

    def forward(self, batch: dict, outputs: dict, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        values = {name: term(batch, outputs, model, step) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        logs = {name: value.detach() for name, value in values.items()}
        return {"loss": total, **logs}
