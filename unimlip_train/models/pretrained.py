"""Pretrained tower weights: where they come from, the timm pretrained config that goes with them, and one clear
error naming the config key and what to download when they are missing (offline clusters).

Image tower, ``model.image.pretrained``:
  * ``hub``: timm's weights for the tag in ``model.image.name`` (e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
    which timm takes from the Hugging Face hub or, offline (``HF_HUB_OFFLINE=1``), from its cache;
  * a folder with ``config.json`` (a timm hub repository: what ``unimlip-fetch-weights`` or
    ``huggingface-cli download timm/NAME --local-dir DIR`` writes): its own pretrained config and weights;
  * a weights file, or a folder holding one: those weights with the pretrained config of the tag in
    ``model.image.name`` (name the tag, or the normalisation may not be the one the weights were trained with).
Text tower, ``model.text.name``: a hub id (in the Hugging Face cache when offline) or a local folder.

``resolve_towers`` is the model-side step of loading a config (``load_config(..., resolve=resolve_towers)``):
config itself knows no models, so the timm name check and the pretrained input config happen here, still when
the config loads, before any process starts, with errors that name the key and the file.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from typing import Iterator

import timm
from timm.models import parse_model_name

from unimlip_train.config.origins import ConfigError, Origins
from unimlip_train.config.schema import Config

HUB = "hub"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")
FETCH_HINT = ("on a machine with internet, `unimlip-fetch-weights CONFIG --out DIR` downloads the weights and "
              "prints the overrides to use")


@dataclass(frozen=True)
class ImageWeights:
    """Pretrained image weights: timm's pretrained config of them, and a local file ('' = from the hub/cache)."""

    pretrained_cfg: dict
    file: str = ""

    def create_kwargs(self) -> dict:
        """``timm.create_model`` arguments that load these weights (a local file overrides the hub source)."""
        cfg = dict(self.pretrained_cfg)
        if self.file:
            # timm's custom loaders read the original .npz releases; any other file is a plain state dict
            npz = self.file.endswith(".npz")
            cfg.update(file=self.file, source="", custom_load=bool(cfg.get("custom_load")) and npz)
        return {"pretrained": True, "pretrained_cfg": cfg}

    def describe(self) -> str:
        hub_id = self.pretrained_cfg.get("hf_hub_id")
        return f"timm {self.pretrained_cfg.get('architecture')}" + (f" (hub id {hub_id})" if hub_id else "")


def image_weights(name: str, pretrained: str) -> ImageWeights:
    """Resolve ``model.image.pretrained`` for timm model ``name`` without building the model or downloading."""
    from timm.models import is_model, resolve_pretrained_cfg, split_model_name_tag
    from timm.models._hub import load_model_config_from_path

    arch, tag = split_model_name_tag(name)
    if not is_model(arch):
        raise ValueError(f"model.image.name={name!r}: timm has no such model")
    try:
        registered = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None).to_dict()
    except RuntimeError as e:  # an unknown tag
        raise ValueError(f"model.image.name={name!r}: {e}") from None
    if pretrained == HUB:
        if not (registered.get("hf_hub_id") or registered.get("url")):
            raise ValueError(f"model.image.pretrained=hub: timm has no pretrained weights for {name!r} "
                             f"(timm.list_pretrained('{arch}*') lists the tags that have)")
        return ImageWeights(registered)
    path = os.path.expanduser(pretrained)
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, folder_arch, _ = load_model_config_from_path(path)
        if folder_arch != arch:
            raise ValueError(f"model.image.pretrained={pretrained}: its config.json is for timm model "
                             f"{folder_arch!r}, but model.image.name is {name!r}")
        return ImageWeights(cfg, _weights_file(path, ImageWeights(cfg)))
    return ImageWeights(registered, _weights_file(path, ImageWeights(registered)))


def _weights_file(path: str, weights: ImageWeights) -> str:
    """The file itself, or the first known weights file in the folder."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        what = f"no weights file ({', '.join(WEIGHT_FILES)}) in this folder"
    else:
        what = "no such file or folder"
    raise FileNotFoundError(f"model.image.pretrained={path}: {what}; it should hold the weights of "
                            f"{weights.describe()}; {FETCH_HINT}")


def image_input_config(name: str, pretrained: str, in_chans: int) -> tuple[list[float], list[float], int]:
    """Normalisation mean, std and square input size of the pretrained weights (timm's pretrained config).

    One channel (grayscale into a tower whose first convolution timm summed over RGB) gets the channel average.
    """
    cfg = image_weights(name, pretrained).pretrained_cfg
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [float(m) for m in mean], [float(s) for s in std], int(cfg["input_size"][-1])


@contextlib.contextmanager
def explain_missing(key: str, value: str, what: str) -> Iterator[None]:
    """A hub/cache miss (or an unreadable local file) inside the block becomes one line naming the config key
    and what to download, instead of a traceback on every rank."""
    try:
        yield
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{key}={value}: cannot load {what} ({reason}); on an offline cluster a hub id "
                                f"must already be in the Hugging Face cache; {FETCH_HINT}") from None


def load_text_model(name: str, overrides: dict, weights: bool = True):
    """``AutoModel.from_pretrained(name, **overrides)`` with the missing-weights message of ``explain_missing``;
    ``weights=False``: the same architecture from its config alone, randomly initialised."""
    from transformers import AutoConfig, AutoModel

    with explain_missing("model.text.name", name, f"the text tower {name!r}"):
        if weights:
            return AutoModel.from_pretrained(os.path.expanduser(name), **overrides)
        options = {k: v for k, v in overrides.items() if k != "attn_implementation"}
        return AutoModel.from_config(AutoConfig.from_pretrained(os.path.expanduser(name), **options))



def resolve_towers(cfg: Config, origins: Origins) -> None:
    """Check ``model.image.name`` against timm and that the tokenizer and text tower can be found, then fill in
    what ``model.image.pretrained`` brings (see ``resolve_pretrained``); a ``config.Resolver``, so
    ``load_config`` passes the keys' origins."""
    check_image_name(cfg.model.image.name, origins)
    check_text_sources(cfg, origins)
    resolve_pretrained(cfg, origins)


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/model`` has a slash too): explicit (``./``, ``/``, ``~``) or existing."""
    return name.startswith((".", os.sep, "~")) or os.path.exists(os.path.expanduser(name))


def offline() -> bool:
    """Whether the Hugging Face hub may not be asked (``HF_HUB_OFFLINE``): then a hub id must be cached."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub repository has a snapshot in the local Hugging Face cache."""
    from huggingface_hub import constants

    snapshots = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(snapshots) and bool(os.listdir(snapshots))


def check_text_sources(cfg: Config, origins: Origins) -> None:
    """A local tokenizer or text-tower folder must exist (the text tower's with its ``config.json``), so a missing
    folder fails when the config loads (and ``--print-config``), not after the processes have started. Hub ids
    are checked by ``offline_misses`` when a run starts."""
    for key, value, needs in (("model.tokenizer", cfg.model.tokenizer, ""),
                              ("model.text.name", cfg.model.text.name, "config.json")):
        if value and looks_local(value):
            path = os.path.expanduser(value)
            if not os.path.isdir(path):
                origins.fail(key, f"no folder {path}")
            if needs and not os.path.isfile(os.path.join(path, needs)):
                origins.fail(key, f"{path} has no {needs}: not a Hugging Face model folder")


def offline_misses(cfg: Config) -> list[str]:
    """With ``HF_HUB_OFFLINE`` set, one line per hub id the run needs that is not in the Hugging Face cache (the
    tokenizer, the text tower, timm's image weights), naming the key; [] otherwise. For the start of a run: the
    config itself stays loadable anywhere (``--print-config``, ``unimlip-fetch-weights`` on a connected machine)."""
    if not offline():
        return []
    wanted = [("model.tokenizer", cfg.model.tokenizer), ("model.text.name", cfg.model.text.name)]
    if cfg.model.image.pretrained == HUB:
        wanted.append(("model.image.pretrained", image_weights(cfg.model.image.name, HUB).pretrained_cfg.get("hf_hub_id")))
    return [f"{key}: {value!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {FETCH_HINT}"
            for key, value in wanted if value and not looks_local(value) and not in_hub_cache(value)]


def check_image_name(name: str, origins: Origins) -> None:
    """The timm registry answers without building anything; hub / local-dir names are checked when built."""
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        origins.fail("model.image.name", str(e))
    if source == "local-dir" and not os.path.isdir(model_id):
        origins.fail("model.image.name", f"no folder {model_id}")
    if source is None and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        origins.fail("model.image.name", f"{name!r} is not a timm model{hint}")


def resolve_pretrained(cfg: Config, origins: Origins) -> None:
    """A pretrained image tower brings its normalisation and input size (timm's pretrained config of its weights):
    they fill ``data.mean`` / ``data.std`` when empty and ``data.image_size`` when no file or override sets it, so
    config.yaml records what training used and evaluation reuses it. A missing local weights file fails here,
    before any process starts, whether or not mean and size are set."""
    icfg, d = cfg.model.image, cfg.data
    if not icfg.pretrained:
        return
    try:
        mean, std, size = image_input_config(icfg.name, icfg.pretrained, d.in_chans)
    except (OSError, ValueError) as e:  # the message names the key and what to download
        raise ConfigError(f"{origins.get('model.image.pretrained', 'defaults')}: {e}") from None
    size_set = origins.is_set("data.image_size")
    if not d.mean:
        d.mean, d.std = mean, std
    if not size_set:
        d.image_size = size
