"""Periodic evaluation inside a training run: when it is due, and how the model in training is evaluated without
disturbing the run.

The evaluation itself is a callable the trainer is given (``Validate``; ``unimlip-train`` and the SLURM job pass
``unimlip_train.eval.validate_with_examples``), so the engine never imports the evaluation package. Around it:
the engine's autocast, a forked RNG (evaluation must not consume the training RNG, or resumed runs would
diverge), and under ZeRO-3 an eval copy: the weights are gathered once into a plain model without DeepSpeed's
hooks, since eval forwards through the hooked modules (a different module order than the recorded training
trace, uneven per-rank batch counts) leave the ranks' parameter fetches out of step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from unimlip_train.config.schema import Config
from unimlip_train.models.build import build_model

# validate(model, cfg, tokenizer, rank, world) -> (metrics, retrieval examples to show); called on every rank,
# every rank gets the same metrics.
Validate = Callable[[Any, Config, Any, int, int], tuple[dict[str, float], list]]


def asks_for_validation(cfg: Config) -> bool:
    """The config evaluates during training: ``train.eval_every`` > 0 and a ``data.val`` set."""
    return bool(cfg.train.eval_every > 0 and cfg.data.val)


class PeriodicValidation:
    """``validate`` every ``train.eval_every`` steps (and at the last), on the training model or its eval copy."""

    def __init__(self, validate: Optional[Validate], cfg: Config, tokenizer, device: torch.device,
                 compute_dtype: torch.dtype):
        self.validate, self.cfg, self.tokenizer = validate, cfg, tokenizer
        self.device, self.compute_dtype = device, compute_dtype
        self.eval_copy = None

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return asks_for_validation(cfg) and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)

    def __call__(self, model, rank: int, world: int) -> tuple[dict[str, float], list]:
        """Collective: the metrics and a few retrieval examples of ``model`` (every rank calls it)."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        autocast = (torch.autocast("cuda", dtype=self.compute_dtype) if cuda and self.compute_dtype != torch.float32
                    else torch.autocast("cpu", enabled=False))
        with torch.random.fork_rng(devices=[self.device.index] if cuda else []):
            if cfg.deepspeed.zero_stage == 3 and self.eval_copy is None:
                self.eval_copy = build_model(cfg, self.tokenizer).to(self.device)
            if self.eval_copy is not None:
                import deepspeed  # deepspeed: heavy, imported with the engine that needs it

                with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                    self.eval_copy.load_state_dict({k: v.detach() for k, v in model.state_dict().items()})
                model = self.eval_copy
            with torch.no_grad(), autocast:
                return self.validate(model, cfg, self.tokenizer, rank, world)
