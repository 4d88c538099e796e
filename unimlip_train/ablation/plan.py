"""Configs x seeds -> runs: each one a resolved config, its run directory and its training state.

A run lives in ``RUN_ROOT/<config name>/seed<k>``. It is *finished* when its newest complete checkpoint has
reached ``train.steps`` and was written by the same config (same ``Config.hash``); a finished run is never
trained again. Every config is loaded and validated before anything trains, so a typo fails in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from unimlip_train.config.load import load_config
from unimlip_train.config.origins import ConfigError
from unimlip_train.config.schema import Config
from unimlip_train.data.augment import check_augment
from unimlip_train.export import read_state, resolve_checkpoint
from unimlip_train.models.pretrained import resolve_towers


@dataclass
class Checkpoint:
    """The newest complete checkpoint of a run and what its ``trainer_state.json`` says."""

    path: str
    step: int
    config_hash: str


@dataclass
class AblationRun:
    name: str  # the config file's stem, e.g. clip_only
    config_path: str
    seed: int
    run_dir: Path
    overrides: list[str]  # what was applied to the config file, in order (also the training command's)
    cfg: Config = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"

    @property
    def terms(self) -> list[str]:
        """Loss terms with a non-zero weight, in the objective's order."""
        return list(self.cfg.loss.enabled())

    @property
    def weights(self) -> dict[str, float]:
        return {name: term.weight for name, term in self.cfg.loss.enabled().items()}

    def checkpoint(self) -> Optional[Checkpoint]:
        """The newest complete checkpoint in the run dir, or None."""
        if not self.run_dir.is_dir():
            return None
        try:
            path = resolve_checkpoint(str(self.run_dir))
        except ValueError:
            return None
        state = read_state(path)
        return Checkpoint(path, state.step, state.config_hash)

    def finished(self, force: bool = False) -> Optional[Checkpoint]:
        """The final checkpoint when training is done (``force``: whatever config wrote it), else None."""
        ck = self.checkpoint()
        if ck is None or ck.step < self.cfg.train.steps:
            return None
        return ck if force or ck.config_hash == self.cfg.hash() else None


def plan_runs(configs: list[str], data: str, run_root: Path, steps: Optional[int], seeds: Optional[list[int]],
              overrides: list[str]) -> list[AblationRun]:
    """One run per config and seed, configs in the order given. Raises ConfigError naming the file/key."""
    names: dict[str, str] = {}
    for path in configs:
        name = Path(path).stem
        if name in names:
            raise ConfigError(f"two configs are both named {name!r} ({names[name]}, {path}): their run "
                              "directories would collide; rename one")
        names[name] = path
    if seeds is not None and any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("both --seeds and a seed=... override given: use one")
    base = [f"data.train={data}"] + ([f"train.steps={steps}"] if steps is not None else [])
    runs = []
    for path in configs:
        for seed in seeds if seeds is not None else [None]:
            ovr = base + ([f"seed={seed}"] if seed is not None else []) + list(overrides)
            cfg = load_config(path, ovr, resolve=(resolve_towers, check_augment))
            run_dir = run_root / Path(path).stem / f"seed{cfg.seed}"
            cfg.run_dir = str(run_dir)
            runs.append(AblationRun(Path(path).stem, str(path), cfg.seed, run_dir, ovr, cfg))
    return runs
