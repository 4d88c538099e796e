"""Reading a run configuration: one YAML file, optionally ``extends:`` a base file (resolved relative to the file
that names it), then ``key.sub=value`` overrides from the command line.

Every value is checked against the schema (``config.schema``: types, ``Literal`` choices) as the Config is built,
then by the cross-field checks (``config.validate``), *before* any process group starts; errors name the
offending key and the file it came from (``Origins``).

What config cannot know without the model registry or weights on disk (is ``model.image.name`` a timm model?
which normalisation and input size come with ``model.image.pretrained``?) is one step more, which config does
not import: ``load_config(path, overrides, resolve=(resolve_towers, check_augment))`` with
``unimlip_train.models.pretrained.resolve_towers`` and ``unimlip_train.data.augment.check_augment`` (are the
``data.augment`` names albumentations or project transforms, with arguments they take?), as every entry point
that starts a run does. They get the same ``Origins``, so their errors name the key and the file too (and entry
points exit 2 on them, as on any ``ConfigError``). ``config_from_dict`` rebuilds an already resolved config (a run dir's ``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from typing import Any, Callable, Literal, Optional, Sequence, Union

import yaml

from unimlip_train.config.origins import ConfigError, Origins
from unimlip_train.config.schema import FEATURE_PRESETS, Config, augment_from_former
from unimlip_train.config.validate import apply_global_batch, launch_world_size, validate

log = logging.getLogger(__name__)

#: A step after validation that checks or fills what needs more than the config (see the module doc).
Resolver = Callable[[Config, Origins], None]


def load_config(path: Optional[str] = None, overrides: Optional[list] = None,
                resolve: Union[Resolver, Sequence[Resolver], None] = None) -> Config:
    """Load ``path`` (following ``extends``), apply ``key=value`` overrides, validate, then ``resolve`` (one
    resolver or several in order, e.g. ``models.pretrained.resolve_towers`` and ``data.augment.check_augment``)
    with the keys' origins; return the Config."""
    origins = Origins()
    data = _load_with_extends(path, origins) if path else {}
    for text in overrides or []:
        key, value = _parse_override(text)
        _set_dotted(data, key, value)
        _record_origins(value, key, origins, "command line")
    _read_former_augment(data, origins.set_within("data.augment") or path or "defaults")
    cfg = _build(Config, data, "", origins, path or "defaults")
    apply_feature_preset(cfg, origins.is_set)
    if cfg.train.global_batch_size > 0 and cfg.train.micro_batch_size > 0:  # before the checks that read grad_accum
        apply_global_batch(cfg, origins, launch_world_size())
    validate(cfg, origins)
    for step in ([resolve] if callable(resolve) else resolve or []):
        step(cfg, origins)
    return cfg


def config_from_dict(data: dict, source: str = "dict") -> Config:
    """Rebuild a Config from a resolved mapping (e.g. a run dir's config.yaml or a checkpoint)."""
    _read_former_augment(data, source, quiet=True)
    cfg = _build(Config, data, "", None, source)
    apply_feature_preset(cfg, lambda key: key.split(".")[-1] in (data.get("loss") or {}))
    validate(cfg, Origins())
    return cfg


def _read_former_augment(data: dict, where: str, quiet: bool = False) -> None:
    """A ``data.augment`` mapping of the former form (``min_scale`` ... ``hflip_p``) becomes its list, in place,
    with a note saying what to write (``quiet``: for run dirs and checkpoints, which were written that way)."""
    section = data.get("data")
    augment = section.get("augment") if isinstance(section, dict) else None
    if not isinstance(augment, dict):  # the list, or a value whose error the type check gives
        return
    try:
        data["data"]["augment"] = augment_from_former(augment)
    except KeyError as e:
        raise ConfigError(f"{where}: key 'data.augment': unknown key(s) {e.args[0]} of its former mapping form; "
                          "data.augment is a list of albumentations transforms (docs/training.md#augmentation)") from None
    if not quiet:
        log.warning("%s: data.augment is written in its former mapping form; it is read as the list %s "
                    "(write that list instead: docs/training.md#augmentation)", where, data["data"]["augment"])


def apply_feature_preset(cfg: Config, named: Callable[[str], bool]) -> None:
    """``loss.feature_perturbation=encoder|pooled_dropout`` (issue 9's key) fills the three keys it stands for,
    each only where the config (file, override or resolved mapping) does not name that key itself
    (``named("loss.<key>")``): explicit keys win, and an old run config resolves to what it trained with."""
    for key, value in FEATURE_PRESETS.get(cfg.loss.feature_perturbation, {}).items():
        if not named(f"loss.{key}"):
            setattr(cfg.loss, key, value)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_diff(old: dict, new: dict) -> dict:
    """Dotted keys whose values differ between two config mappings (e.g. two ``Config.to_dict()``), sorted:
    ``{key: (old value, new value)}``; a key missing on one side has the value None there."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


# ----------------------------------------------------------------------------------------------------
# YAML files, extends, overrides
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


def _merge(base: dict, top: dict, origins: Origins, source: str, prefix: str = "") -> dict:
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


def _record_origins(value: Any, dotted: str, origins: Origins, source: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origins(v, f"{dotted}.{k}", origins, source)


def _load_with_extends(path: str, origins: Origins, seen: tuple = ()) -> dict:
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


# ----------------------------------------------------------------------------------------------------
# Building the dataclasses: types and choices
# ----------------------------------------------------------------------------------------------------


def _build(cls: type, data: dict, prefix: str, origins: Optional[Origins], default_origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        origin = (origins or {}).get(dotted, default_origin)
        if key not in names:  # the override 'trian.steps=5' set 'trian.steps': the command line set 'trian'
            origin = (origins.set_within(dotted) if origins else None) or origin
            known = ", ".join(sorted(names))
            raise ConfigError(f"{origin}: unknown key '{dotted}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], dotted, origin, origins)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str, origin: str, origins: Optional[Origins] = None) -> Any:
    """Check ``value`` against annotation ``typ``; ints are accepted where floats are expected. A ``Literal``
    (of values of one type) takes that type, then one of its values."""
    where = f"{origin}: key '{key}'"
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(typ, value, key + ".", origins, origin)
    origin_t = typing.get_origin(typ)
    if origin_t is Literal:
        allowed = typing.get_args(typ)
        value = _coerce(value, type(allowed[0]), key, origin, origins)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {allowed}, got {value!r}")
        return value
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
        raise ConfigError(f"{where}: must be {' or '.join(_describe(a) for a in args)}, got {value!r}")
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


def _describe(typ: Any) -> str:
    """A type as a union error names it: ``one of ('a', 'b')``, ``a list of str``, ``None``, ``a str``."""
    if typing.get_origin(typ) is Literal:
        return f"one of {typing.get_args(typ)}"
    if typing.get_origin(typ) is list:
        return "a list" + "".join(f" of {a.__name__}" for a in typing.get_args(typ))
    return "None" if typ is type(None) else f"a {getattr(typ, '__name__', typ)}"
