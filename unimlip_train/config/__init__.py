"""Typed, validated run configuration: ``schema`` (the dataclasses, one ``Literal`` per set of choices), ``load``
(YAML ``extends``, ``key.sub=value`` overrides, type checks), ``validate`` (cross-field checks), ``origins``
(which file set each key, so every error names it). Config imports no other package of ours; the model-side
step (timm name, pretrained input config) is ``unimlip_train.models.pretrained.resolve_towers``, passed to
``load_config(..., resolve=...)`` by the entry points.
"""
from unimlip_train.config.load import Resolver, config_diff, config_from_dict, dump_yaml, load_config
from unimlip_train.config.origins import ConfigError, Origins
from unimlip_train.config.schema import (
    SECTION_CHOICES,
    SECTION_ORDERS,
    WANDB_SETTINGS,
    AugmentConfig,
    Config,
    DataConfig,
    DataSource,
    DeepSpeedConfig,
    EvalConfig,
    FusionConfig,
    ImageTowerConfig,
    LossConfig,
    ModelConfig,
    MonitorConfig,
    TermConfig,
    TextConfig,
    TextTowerConfig,
    TrainConfig,
)
from unimlip_train.config.validate import launch_world_size, validate

__all__ = [
    "SECTION_CHOICES", "SECTION_ORDERS", "WANDB_SETTINGS", "AugmentConfig", "Config", "ConfigError", "DataConfig",
    "DataSource", "DeepSpeedConfig", "EvalConfig", "FusionConfig", "ImageTowerConfig", "LossConfig", "ModelConfig",
    "MonitorConfig", "Origins", "Resolver", "TermConfig", "TextConfig", "TextTowerConfig", "TrainConfig",
    "config_diff", "config_from_dict", "dump_yaml", "launch_world_size", "load_config", "validate",
]
