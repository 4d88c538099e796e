"""Cross-field checks and value ranges of a built Config: impossible combinations fail here, before any process
group starts, each naming the key and where it was set.

The choices of single keys are not checked here: they are ``Literal`` types in ``config.schema``, enforced as the
config is built. What needs the model registry or weights on disk (the timm name, pretrained input config) is not
checked here either: config knows no models; ``unimlip_train.models.pretrained.resolve_towers`` does that step.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from unimlip_train.config.origins import ConfigError, Origins
from unimlip_train.config.schema import WANDB_SETTINGS, Config, DataConfig, TermConfig

# Numeric keys with a range: (low, high, low inclusive, high inclusive); None = unbounded on that side.
_RANGES = {
    "train.lr": (0.0, None, False, True),
    "train.lr_image": (0.0, None, True, True),  # 0: use train.lr (likewise for the three below)
    "train.lr_text": (0.0, None, True, True),
    "train.lr_head": (0.0, None, True, True),
    "train.lr_temperature": (0.0, None, True, True),
    "train.weight_decay": (0.0, None, True, True),
    "train.layer_decay": (0.0, 1.0, False, True),
    "train.warmup_steps": (0, None, True, True),
    "train.clip_grad": (0.0, None, True, True),
    "train.checkpoint_every": (0, None, True, True),
    "train.checkpoint_minutes": (0.0, None, True, True),
    "train.image_every": (0, None, True, True),
    "train.keep_checkpoints": (0, None, True, True),
    "train.global_batch_size": (0, None, True, True),
    "train.eval_every": (0, None, True, True),
    "train.hang_timeout_s": (0.0, None, True, True),
    "train.spike_factor": (0.0, None, True, True),
    "train.max_rollbacks": (0, None, True, True),
    "data.num_workers": (0, None, True, True),
    "data.shuffle_buffer": (0, None, True, True),
    "data.samples_per_epoch": (0, None, True, True),
    "data.max_skip_fraction": (0.0, 1.0, True, True),
    "data.max_image_pixels": (0, None, True, True),
    "model.init_temperature": (0.0, None, False, True),
}
_POSITIVE = ("train.steps", "train.micro_batch_size", "train.grad_accum", "train.log_every",
             "train.max_nonfinite_in_row", "train.spike_window", "train.spike_patience", "data.image_size",
             "model.embed_dim", "data.text.max_length", "model.fusion.image_stages")
_FEATURE_TERMS = ("itc_feature", "image_feature", "text_feature")
_CONTRASTIVE_TERMS = ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "uniformity")
_NT_XENT_TERMS = ("image_ssl", "image_feature", "text_ssl", "text_feature")


def launch_world_size() -> int:
    """Processes of this launch as the launcher announces them (torchrun / deepspeed / srun), else 1."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def global_batch_error(global_batch: int, micro_batch: int, world: int) -> str:
    """'' when ``global_batch`` is a whole number of micro batches on every one of ``world`` ranks; else why not,
    naming the three numbers."""
    if global_batch % (micro_batch * world) == 0:
        return ""
    return (f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x {world} ranks = "
            f"{micro_batch * world}: no whole number of accumulation steps makes it (choose another global batch, "
            "micro batch or number of ranks)")


def derive_grad_accum(global_batch: int, micro_batch: int, world: int) -> int:
    """``train.grad_accum`` that makes ``train.global_batch_size`` at ``world`` ranks: global / (micro x world),
    which must divide exactly (ConfigError naming the three numbers otherwise)."""
    if problem := global_batch_error(global_batch, micro_batch, world):
        raise ConfigError(f"train.global_batch_size: {problem}")
    return global_batch // (micro_batch * world)


def apply_global_batch(cfg: Config, origins: Origins, world: int) -> None:
    """With ``train.global_batch_size`` set, derive ``train.grad_accum`` for ``world`` ranks (it wins over a
    ``grad_accum`` in the file: a resume at another world size keeps the batch and the schedule's meaning)."""
    t = cfg.train
    if t.global_batch_size > 0:
        if problem := global_batch_error(t.global_batch_size, t.micro_batch_size, world):
            origins.fail("train.global_batch_size", problem, "train.micro_batch_size")
        t.grad_accum = derive_grad_accum(t.global_batch_size, t.micro_batch_size, world)


def validate(cfg: Config, origins: Origins) -> None:
    """Cross-field checks: impossible combinations fail here, before any process group starts."""
    for key in _POSITIVE:
        if _get_dotted(cfg, key) <= 0:
            origins.fail(key, "must be positive")
    _validate_sections(cfg.data, origins)
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        origins.fail("train.min_lr_ratio", "must be in [0, 1]")
    if not 0.0 <= cfg.data.mlm_probability < 1.0:
        origins.fail("data.mlm_probability", "must be in [0, 1)")
    _check_ranges(cfg, origins)
    enabled = cfg.loss.enabled()
    if not enabled:
        origins.fail("loss", "every loss term has weight 0: nothing to train")
    if "mlm" in enabled and cfg.data.mlm_probability == 0.0:
        origins.fail("loss.mlm.weight", "masked language modelling is on but data.mlm_probability is 0",
                     "data.mlm_probability")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        origins.fail("deepspeed.offload_optimizer", "optimizer offload needs ZeRO stage 1 or higher",
                     "deepspeed.zero_stage")
    if cfg.deepspeed.zero_stage == 3 and cfg.train.compile:
        origins.fail("train.compile", "torch.compile of the towers is not supported together with ZeRO-3",
                     "deepspeed.zero_stage")
    _validate_objective(cfg, origins)
    if cfg.data.resampled and not cfg.data.samples_per_epoch and not _is_index_source(cfg.data.train):
        origins.fail("data.samples_per_epoch", "resampled streaming needs samples_per_epoch or an index.json")
    for key in sorted(set(cfg.monitor.wandb) - set(WANDB_SETTINGS)):
        origins.fail(f"monitor.wandb.{key}", f"unknown Weights & Biases setting (known: {', '.join(WANDB_SETTINGS)})")
    _validate_transfer(cfg, origins)


def _validate_sections(data: DataConfig, origins: Origins) -> None:
    """A list of section names (the one-word choices are the schema's ``Sections``)."""
    sections = data.text.sections
    if isinstance(sections, list) and (not sections or not all(isinstance(x, str) and x for x in sections)):
        origins.fail("data.text.sections", f"a list must hold section names, got {sections!r}")


def _validate_transfer(cfg: Config, origins: Origins) -> None:
    """Locking, layer decay and normalisation keys (LiT / open_clip semantics)."""
    for tower in ("image", "text"):
        key = f"model.{tower}.lock_unlocked_groups"
        groups = _get_dotted(cfg, key)
        if groups < 0:
            origins.fail(key, f"must be >= 0, got {groups}")
        if groups and not _get_dotted(cfg, f"model.{tower}.lock"):
            origins.fail(key, "only applies to a locked tower", f"model.{tower}.lock")
    if not 0.0 < cfg.train.layer_decay <= 1.0:
        origins.fail("train.layer_decay", f"must be in (0, 1] (1: off), got {cfg.train.layer_decay}")
    d = cfg.data
    if bool(d.mean) != bool(d.std):
        origins.fail("data.mean", "data.mean and data.std are set together", "data.std")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if values and (len(values) != d.in_chans or not all(isinstance(v, (int, float)) for v in values)):
            origins.fail(key, f"needs {d.in_chans} numbers (data.in_chans), got {values!r}")
    if d.std and min(d.std) <= 0:
        origins.fail("data.std", f"must be positive, got {d.std}")


def _check_ranges(cfg: Config, origins: Origins) -> None:
    for key, (low, high, low_incl, high_incl) in _RANGES.items():
        value = _get_dotted(cfg, key)
        too_low = low is not None and (value < low if low_incl else value <= low)
        too_high = high is not None and (value > high if high_incl else value >= high)
        if too_low or too_high:
            lo = "-inf" if low is None else f"{'[' if low_incl else '('}{low}"
            hi = "inf)" if high is None else f"{high}{']' if high_incl else ')'}"
            origins.fail(key, f"must be in {lo}, {hi}, got {value}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                  for b in betas):
        origins.fail("train.betas", f"must be two numbers in [0, 1), got {betas!r}")


def _validate_objective(cfg: Config, origins: Origins) -> None:
    """Objective combinations that would train nothing, or silently something else."""
    loss, model = cfg.loss, cfg.model
    enabled = loss.enabled()
    for f in dataclasses.fields(loss):
        term = getattr(loss, f.name)
        if isinstance(term, TermConfig) and f.name != "itc" and term.kind != "infonce":
            origins.fail(f"loss.{f.name}.kind", "only loss.itc.kind chooses the image-text loss "
                                                "(itc_feature follows it)")
    for key in ("model.image.token_drop", "model.image.spatial_drop", "model.text.dropout", "model.feature_dropout"):
        if not 0.0 <= _get_dotted(cfg, key) < 1.0:
            origins.fail(key, "must be in [0, 1)")
    on = [t for t in _FEATURE_TERMS if t in enabled]
    if on and loss.feature_noise == "pooled_dropout" and model.feature_dropout == 0:
        origins.fail(f"loss.{on[0]}.weight", "a feature-level term is on but its perturbation is off",
                     "model.feature_dropout", "loss.feature_noise")
    if on and loss.feature_noise == "encoder":
        text_dropout = model.text.config.get("hidden_dropout_prob", model.text.dropout)
        if {"itc_feature", "text_feature"} & set(on) and text_dropout == 0:
            origins.fail(f"loss.{on[0]}.weight", "a text feature-level term is on but the text encoder has "
                         "no dropout", "model.text.dropout")
        if {"itc_feature", "image_feature"} & set(on) and model.image.token_drop == 0 and model.image.spatial_drop == 0:
            origins.fail(f"loss.{on[0]}.weight", "an image feature-level term is on but the image tower has "
                         "no perturbation", "model.image.token_drop", "model.image.spatial_drop")
    contrastive = [t for t in _CONTRASTIVE_TERMS if t in enabled]
    per_rank = cfg.train.micro_batch_size * (cfg.train.grad_accum if cfg.train.negatives == "accumulated" else 1)
    if contrastive and per_rank * launch_world_size() < 2:
        origins.fail(f"loss.{contrastive[0]}.weight", f"contrastive terms need a global batch of at least 2 "
                     f"(micro batch x ranks{' x grad_accum' if cfg.train.negatives == 'accumulated' else ''} = "
                     f"{per_rank * launch_world_size()}): no negatives", "train.micro_batch_size", "train.grad_accum")
    _validate_term_options(cfg, origins)


def _validate_term_options(cfg: Config, origins: Origins) -> None:
    """Issue 21's options of single terms: ITM's negatives, the auxiliary ramp, centring, MLM's view."""
    loss = cfg.loss
    if loss.itm_hardness < 0:
        origins.fail("loss.itm_hardness", f"must be >= 0 (0: uniform negatives, 1: ALBEF), got {loss.itm_hardness}")
    if not 0.0 < loss.itm_fraction <= 1.0:
        origins.fail("loss.itm_fraction", f"must be in (0, 1], got {loss.itm_fraction}")
    if loss.aux_warmup_steps < 0:
        origins.fail("loss.aux_warmup_steps", f"must be >= 0 (0: off), got {loss.aux_warmup_steps}")
    for f in dataclasses.fields(loss):
        term = getattr(loss, f.name)
        if isinstance(term, TermConfig) and term.center and f.name not in _NT_XENT_TERMS:
            origins.fail(f"loss.{f.name}.center", f"only the uni-modal NT-Xent terms ({', '.join(_NT_XENT_TERMS)}) "
                         "center their embeddings")
    enabled = loss.enabled()
    if loss.mlm_view == "augmented" and "mlm" in enabled and "text_ssl" not in enabled:
        origins.fail("loss.mlm_view", "MLM on the augmented report reads text_ssl's pass of it, but text_ssl "
                     "is off", "loss.text_ssl.weight")


def _is_index_source(train: Any) -> bool:
    return isinstance(train, str) and (train.endswith("index.json") or os.path.isdir(train))


def _get_dotted(obj: Any, dotted: str) -> Any:
    """``_get_dotted(cfg, "model.image.name")``: the value of a dotted key of a Config."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
