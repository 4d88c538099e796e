"""Typed, validated run configuration.

One YAML file, optionally ``extends:`` a base file (resolved relative to the file that names it), then
``key.sub=value`` overrides from the command line. Every value is checked against the dataclass schema
below *before* any process group starts, and errors name the offending key and the file it came from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the file."""


# ----------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """One shard source mixed into training: brace pattern, shard list file, directory or index.json."""

    path: str = ""
    weight: float = 1.0
    split: str = "train"


@dataclass
class AugmentConfig:
    """Medical-tailored image augmentation (no colour jitter, mild crops, no flips by default)."""

    min_scale: float = 0.5
    max_scale: float = 1.0
    rotate_degrees: float = 10.0
    shift_fraction: float = 0.05
    clahe_p: float = 0.3
    gamma_p: float = 0.3
    contrast_p: float = 0.3
    blur_p: float = 0.1
    noise_p: float = 0.1
    hflip_p: float = 0.0


@dataclass
class TextConfig:
    """Report handling before tokenization, and the light text augmentation for the second view."""

    # findings+impression | impression | findings | random, or a list of section names (read in its own order)
    sections: Union[str, list] = "findings+impression"
    order: str = "impression_first"  # impression_first | findings_first: truncation drops findings first
    max_length: int = 64
    sentence_shuffle_p: float = 0.5
    sentence_drop_p: float = 0.2
    span_mask_p: float = 0.0


@dataclass
class DataConfig:
    train: Any = ""  # str (pattern / index.json / dir) or list of DataSource mappings
    val: Any = ""
    image_size: int = 224
    in_chans: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: int = 0  # 0: from index.json (required when resampled)
    mlm_probability: float = 0.15
    view: str = "random"  # random | frontal | pair: which image of a multi-view (study) sample
    max_skip_fraction: float = 0.01  # corrupt samples skipped / samples read, above which training stops
    # Per-channel normalisation. Empty: CLIP's constants for a random-init image tower; with
    # model.image.pretrained, the timm pretrained config of those weights (filled in when the config loads).
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ImageTowerConfig:
    """A timm model by name (a tag such as ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` picks its weights);
    ``pretrained``: '' (random init), ``hub`` (timm's weights of that tag, from the hub or the Hugging Face
    cache) or a local weights file / folder."""

    name: str = "vit_tiny_patch16_224"
    pretrained: str = ""
    kwargs: dict = field(default_factory=dict)
    token_drop: float = 0.5  # FLIP patch dropout of the feature-level image pass (loss.feature_perturbation=encoder)
    spatial_drop: float = 0.1  # the same pass's spatial dropout of CNN stage outputs (towers without patch tokens)
    lock: bool = False  # LiT: freeze the tower (eval mode, no optimizer state)
    lock_unlocked_groups: int = 0  # with lock: the last N blocks stay trainable


@dataclass
class TextTowerConfig:
    """A Hugging Face encoder: ``name`` is a hub id or local folder; empty means random init from ``config``."""

    name: str = ""
    config: dict = field(default_factory=dict)
    pooling: str = "cls"  # cls | mean
    dropout: float = 0.1  # the encoder's own dropout, active in every layer (SimCSE's feature-level noise)
    lock: bool = False
    lock_unlocked_groups: int = 0


@dataclass
class FusionConfig:
    layers: int = 2
    heads: int = 4


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    tokenizer: str = ""  # hub id or local folder; empty: the text tower's name
    embed_dim: int = 256
    projection: str = "linear"  # linear | mlp
    ssl_embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    feature_dropout: float = 0.1
    fusion: FusionConfig = field(default_factory=FusionConfig)
    grad_checkpointing: bool = False


@dataclass
class TermConfig:
    weight: float = 1.0
    temperature: float = 0.1  # for uni-modal NT-Xent terms; ITC terms use the model's learnable one
    kind: str = "infonce"  # itc / itc_feature only: infonce (CLIP) | sigmoid (SigLIP)


@dataclass
class LossConfig:
    """The Uni-Mlip objective matrix: scope (cross / image / text / fused) x level (data / feature)."""

    itc: TermConfig = field(default_factory=TermConfig)
    itc_feature: TermConfig = field(default_factory=TermConfig)
    image_ssl: TermConfig = field(default_factory=TermConfig)
    image_feature: TermConfig = field(default_factory=TermConfig)
    text_ssl: TermConfig = field(default_factory=TermConfig)
    text_feature: TermConfig = field(default_factory=TermConfig)
    mlm: TermConfig = field(default_factory=TermConfig)
    itm: TermConfig = field(default_factory=TermConfig)
    positives: str = "report"  # report | report+group | none: which other samples count as the same pair
    feature_perturbation: str = "encoder"  # encoder | pooled_dropout
    text_ssl_space: str = "ssl_head"  # ssl_head | shared: where text_ssl contrasts report and augmented report

    def enabled(self) -> dict:
        """Terms with a non-zero weight, by name."""
        terms = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: t for name, t in terms if isinstance(t, TermConfig) and t.weight != 0}


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 32
    grad_accum: int = 1
    negatives: str = "accumulated"  # accumulated | micro: contrastive negatives span the K micro batches or one
    optimizer: str = "adamw"  # adamw | fused_adam | cpu_adam
    lr: float = 5e-4
    lr_image: float = 0.0  # 0: use lr
    lr_text: float = 0.0
    lr_head: float = 0.0
    lr_temperature: float = 0.0
    weight_decay: float = 0.1
    layer_decay: float = 1.0  # layer-wise lr decay of both towers (1: off)
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0
    checkpoint_every: int = 100
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
    image_every: int = 0  # TensorBoard grid of augmented view pairs every N steps (0: only at the start)
    keep_checkpoints: int = 3
    log_every: int = 10
    max_nonfinite_in_row: int = 5
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend of the towers (aot_eager: graph capture only)
    eval_every: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    offload_optimizer: bool = False
    backend: str = ""  # '' picks nccl on CUDA, gloo on CPU


@dataclass
class EvalConfig:
    """Periodic evaluation during training; also the defaults of ``unimlip-eval``."""

    split: str = "val"
    max_samples: int = 0
    classes: list = field(default_factory=list)
    label_key: str = "labels"
    prompts: str = ""  # prompt YAML for zero-shot; empty: the packaged chest X-ray set
    multi_label: bool = False


#: ``monitor.wandb`` keys, passed to ``wandb.init`` (the run id, resume mode and folder come from the run dir).
WANDB_SETTINGS = ("project", "entity", "name", "group", "tags", "notes", "mode", "job_type")


@dataclass
class MonitorConfig:
    wandb: dict = field(default_factory=dict)  # {project, entity, ...}: optional Weights & Biases mirror


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that defines the model and objective (not run bookkeeping)."""
        d = self.to_dict()
        d.pop("run_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, origins: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge ``top`` into ``base``; ``origins`` records which file set each dotted key."""
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, source, dotted + ".")
        else:
            out[key] = value
            _record_origins(value, dotted, origins, source)
    return out


def _record_origins(value: Any, dotted: str, origins: dict, source: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origins(v, f"{dotted}.{k}", origins, source)


def _load_with_extends(path: str, origins: dict, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    base_ref = data.pop("extends", None)
    merged: dict = {}
    if base_ref:
        if not isinstance(base_ref, str):
            raise ConfigError(f"{path}: 'extends' must be a file path")
        base_path = base_ref if os.path.isabs(base_ref) else os.path.join(os.path.dirname(path), base_ref)
        merged = _load_with_extends(base_path, origins, seen + (path,))
    return _merge(merged, data, origins, path)


def _parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _coerce(value: Any, typ: Any, key: str, origin: str, origins: Optional[dict] = None) -> Any:
    """Check ``value`` against annotation ``typ``; ints are accepted where floats are expected."""
    where = f"{origin}: key '{key}'"
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(typ, value, key + ".", origins, origin)
    origin_t = typing.get_origin(typ)
    if origin_t in (Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origin, origins)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {typ}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or origin_t is list:
        if isinstance(value, list):
            return list(value)
    elif typ is dict or origin_t is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str, origins: Optional[dict], default_origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        origin = (origins or {}).get(dotted, default_origin)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{origin}: unknown key '{dotted}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], dotted, origin, origins)
    return cls(**kwargs)


class _OriginTracker(dict):
    """Key-origin lookup that falls back to the nearest parent key's origin."""

    def get(self, key, default=None):
        while key:
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
            key = key.rpartition(".")[0]
        return default


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Load ``path`` (following ``extends``), apply ``key=value`` overrides, validate, return a Config."""
    origins = _OriginTracker()
    data = _load_with_extends(path, origins) if path else {}
    for text in overrides or []:
        key, value = _parse_override(text)
        _set_dotted(data, key, value)
        _record_origins(value, key, origins, "command line")
    cfg = _build(Config, data, "", origins, path or "defaults")
    validate(cfg, origins)
    _resolve_pretrained(cfg, origins)
    return cfg


def config_from_dict(data: dict, source: str = "dict") -> Config:
    """Rebuild a Config from a resolved mapping (e.g. a run dir's config.yaml or a checkpoint)."""
    cfg = _build(Config, data, "", None, source)
    validate(cfg, _OriginTracker())
    return cfg


def _fail(origins: dict, key: str, msg: str, *related: str) -> None:
    """Raise for ``key``; ``related`` keys of an impossible combination are named with their own origin."""
    others = "".join(f" ('{k}' from {origins.get(k, 'defaults')})" for k in related)
    raise ConfigError(f"{origins.get(key, 'defaults')}: key '{key}': {msg}{others}")


def validate(cfg: Config, origins: dict) -> None:
    """Cross-field checks: impossible combinations fail here, before any process group starts."""
    choices = {
        "model.text.pooling": ("cls", "mean"),
        "model.projection": ("linear", "mlp"),
        "train.optimizer": ("adamw", "fused_adam", "cpu_adam"),
        "deepspeed.precision": ("fp32", "bf16", "fp16"),
        "deepspeed.backend": ("", "gloo", "nccl"),
        "loss.positives": ("report", "report+group", "none"),
        "loss.feature_perturbation": ("encoder", "pooled_dropout"),
        "loss.text_ssl_space": ("ssl_head", "shared"),
        "loss.itc.kind": ("infonce", "sigmoid"),
        "train.negatives": ("accumulated", "micro"),
    }
    for key, allowed in choices.items():
        value = _get_dotted(cfg, key)
        if value not in allowed:
            _fail(origins, key, f"must be one of {allowed}, got {value!r}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        _fail(origins, "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    for key in ("train.steps", "train.micro_batch_size", "train.grad_accum", "train.log_every",
                "train.max_nonfinite_in_row", "data.image_size", "model.embed_dim", "data.text.max_length"):
        if _get_dotted(cfg, key) <= 0:
            _fail(origins, key, "must be positive")
    _validate_data_choices(cfg.data, origins)
    if cfg.data.in_chans not in (1, 3):
        _fail(origins, "data.in_chans", f"must be 1 or 3, got {cfg.data.in_chans}")
    if not 0.0 < cfg.data.augment.min_scale <= cfg.data.augment.max_scale <= 1.0:
        _fail(origins, "data.augment.min_scale", "need 0 < min_scale <= max_scale <= 1")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        _fail(origins, "train.min_lr_ratio", "must be in [0, 1]")
    if not 0.0 <= cfg.data.mlm_probability < 1.0:
        _fail(origins, "data.mlm_probability", "must be in [0, 1)")
    _check_ranges(cfg, origins)
    _check_image_model(cfg.model.image.name, origins)
    enabled = cfg.loss.enabled()
    if not enabled:
        _fail(origins, "loss", "every loss term has weight 0: nothing to train")
    if "mlm" in enabled and cfg.data.mlm_probability == 0.0:
        _fail(origins, "loss.mlm.weight", "masked language modelling is on but data.mlm_probability is 0",
              "data.mlm_probability")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        _fail(origins, "deepspeed.offload_optimizer", "optimizer offload needs ZeRO stage 1 or higher",
              "deepspeed.zero_stage")
    if cfg.deepspeed.zero_stage == 3 and cfg.train.compile:
        _fail(origins, "train.compile", "torch.compile of the towers is not supported together with ZeRO-3",
              "deepspeed.zero_stage")
    _validate_objective(cfg, origins)
    if cfg.data.resampled and not cfg.data.samples_per_epoch and not _is_index_source(cfg.data.train):
        _fail(origins, "data.samples_per_epoch", "resampled streaming needs samples_per_epoch or an index.json")
    for key in sorted(set(cfg.monitor.wandb) - set(WANDB_SETTINGS)):
        _fail(origins, f"monitor.wandb.{key}", f"unknown Weights & Biases setting (known: {', '.join(WANDB_SETTINGS)})")
    _validate_transfer(cfg, origins)


def _validate_transfer(cfg: Config, origins: dict) -> None:
    """Locking, layer decay and normalisation keys (LiT / open_clip semantics)."""
    for tower in ("image", "text"):
        key = f"model.{tower}.lock_unlocked_groups"
        groups = _get_dotted(cfg, key)
        if groups < 0:
            _fail(origins, key, f"must be >= 0, got {groups}")
        if groups and not _get_dotted(cfg, f"model.{tower}.lock"):
            _fail(origins, key, "only applies to a locked tower", f"model.{tower}.lock")
    if not 0.0 < cfg.train.layer_decay <= 1.0:
        _fail(origins, "train.layer_decay", f"must be in (0, 1] (1: off), got {cfg.train.layer_decay}")
    d = cfg.data
    if bool(d.mean) != bool(d.std):
        _fail(origins, "data.mean", "data.mean and data.std are set together", "data.std")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if values and (len(values) != d.in_chans or not all(isinstance(v, (int, float)) for v in values)):
            _fail(origins, key, f"needs {d.in_chans} numbers (data.in_chans), got {values!r}")
    if d.std and min(d.std) <= 0:
        _fail(origins, "data.std", f"must be positive, got {d.std}")


def _resolve_pretrained(cfg: Config, origins: dict) -> None:
    """A pretrained image tower brings its normalisation and input size (timm's pretrained config of its weights):
    they fill ``data.mean`` / ``data.std`` when empty and ``data.image_size`` when no file or override sets it, so
    config.yaml records what training used and evaluation reuses it. A missing local weights file fails here,
    before any process starts."""
    icfg, d = cfg.model.image, cfg.data
    size_set = dict.__contains__(origins, "data.image_size")
    if not icfg.pretrained or (d.mean and size_set):
        return
    from unimlip_train.models.pretrained import image_input_config

    try:
        mean, std, size = image_input_config(icfg.name, icfg.pretrained, d.in_chans)
    except (OSError, ValueError) as e:  # the message names the key and what to download
        raise ConfigError(f"{origins.get('model.image.pretrained', 'defaults')}: {e}") from None
    if not d.mean:
        d.mean, d.std = mean, std
    if not size_set:
        d.image_size = size


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
    "train.eval_every": (0, None, True, True),
    "data.num_workers": (0, None, True, True),
    "data.shuffle_buffer": (0, None, True, True),
    "data.samples_per_epoch": (0, None, True, True),
    "data.max_skip_fraction": (0.0, 1.0, True, True),
    "model.init_temperature": (0.0, None, False, True),
}


def _check_ranges(cfg: Config, origins: dict) -> None:
    for key, (low, high, low_incl, high_incl) in _RANGES.items():
        value = _get_dotted(cfg, key)
        too_low = low is not None and (value < low if low_incl else value <= low)
        too_high = high is not None and (value > high if high_incl else value >= high)
        if too_low or too_high:
            lo = "-inf" if low is None else f"{'[' if low_incl else '('}{low}"
            hi = "inf)" if high is None else f"{high}{']' if high_incl else ')'}"
            _fail(origins, key, f"must be in {lo}, {hi}, got {value}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                  for b in betas):
        _fail(origins, "train.betas", f"must be two numbers in [0, 1), got {betas!r}")


def _check_image_model(name: str, origins: dict) -> None:
    """The timm registry answers without building anything; hub / local-dir names are checked when built."""
    import timm
    from timm.models import parse_model_name

    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        _fail(origins, "model.image.name", str(e))
    if source == "local-dir" and not os.path.isdir(model_id):
        _fail(origins, "model.image.name", f"no folder {model_id}")
    if source is None and not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        _fail(origins, "model.image.name", f"{name!r} is not a timm model{hint}")


_FEATURE_TERMS = ("itc_feature", "image_feature", "text_feature")
_CONTRASTIVE_TERMS = ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature")


def launch_world_size() -> int:
    """Processes of this launch as the launcher announces them (torchrun / deepspeed / srun), else 1."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _validate_objective(cfg: Config, origins: dict) -> None:
    """Objective combinations that would train nothing, or silently something else."""
    loss, model = cfg.loss, cfg.model
    enabled = loss.enabled()
    for f in dataclasses.fields(loss):
        term = getattr(loss, f.name)
        if isinstance(term, TermConfig) and f.name != "itc" and term.kind != "infonce":
            _fail(origins, f"loss.{f.name}.kind", "only loss.itc.kind chooses the image-text loss "
                                                  "(itc_feature follows it)")
    for key in ("model.image.token_drop", "model.image.spatial_drop", "model.text.dropout", "model.feature_dropout"):
        if not 0.0 <= _get_dotted(cfg, key) < 1.0:
            _fail(origins, key, "must be in [0, 1)")
    on = [t for t in _FEATURE_TERMS if t in enabled]
    if on and loss.feature_perturbation == "pooled_dropout" and model.feature_dropout == 0:
        _fail(origins, f"loss.{on[0]}.weight", "a feature-level term is on but its perturbation is off",
              "model.feature_dropout", "loss.feature_perturbation")
    if on and loss.feature_perturbation == "encoder":
        text_dropout = model.text.config.get("hidden_dropout_prob", model.text.dropout)
        if {"itc_feature", "text_feature"} & set(on) and text_dropout == 0:
            _fail(origins, f"loss.{on[0]}.weight", "a text feature-level term is on but the text encoder has "
                  "no dropout", "model.text.dropout")
        if {"itc_feature", "image_feature"} & set(on) and model.image.token_drop == 0 and model.image.spatial_drop == 0:
            _fail(origins, f"loss.{on[0]}.weight", "an image feature-level term is on but the image tower has "
                  "no perturbation", "model.image.token_drop", "model.image.spatial_drop")
    contrastive = [t for t in _CONTRASTIVE_TERMS if t in enabled]
    per_rank = cfg.train.micro_batch_size * (cfg.train.grad_accum if cfg.train.negatives == "accumulated" else 1)
    if contrastive and per_rank * launch_world_size() < 2:
        _fail(origins, f"loss.{contrastive[0]}.weight", f"contrastive terms need a global batch of at least 2 "
              f"(micro batch x ranks{' x grad_accum' if cfg.train.negatives == 'accumulated' else ''} = "
              f"{per_rank * launch_world_size()}): no negatives", "train.micro_batch_size", "train.grad_accum")


def _validate_data_choices(data: DataConfig, origins: dict) -> None:
    """The data keys with fixed choices (names as ``unimlip_train.data.text`` and the loader read them)."""
    sections = data.text.sections
    if isinstance(sections, str) and sections not in ("findings+impression", "impression", "findings", "random"):
        _fail(origins, "data.text.sections", "must be findings+impression, impression, findings or random "
              f"(or a list of section names), got {sections!r}")
    if isinstance(sections, list) and (not sections or not all(isinstance(x, str) and x for x in sections)):
        _fail(origins, "data.text.sections", f"a list must hold section names, got {sections!r}")
    if data.text.order not in ("impression_first", "findings_first"):
        _fail(origins, "data.text.order", f"must be impression_first or findings_first, got {data.text.order!r}")
    if data.view not in ("random", "frontal", "pair"):
        _fail(origins, "data.view", f"must be random, frontal or pair, got {data.view!r}")


def _is_index_source(train: Any) -> bool:
    return isinstance(train, str) and (train.endswith("index.json") or os.path.isdir(train))


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_diff(old: dict, new: dict) -> dict:
    """Dotted keys whose values differ between two config mappings (e.g. two ``Config.to_dict()``), sorted:
    ``{key: (old value, new value)}``; a key missing on one side has the value None there."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
