"""Export a checkpoint as an open_clip model folder, built like BiomedCLIP: a timm image tower and a Hugging Face
text tower with linear projections (open_clip's ``CustomTextCLIP``).

``open_clip.create_model_and_transforms("local-dir:DIR")`` then loads the image and text towers, the projections
and the temperature, and ``open_clip.get_tokenizer("local-dir:DIR")`` the tokenizer. Uni-Mlip's training-only
parts (image SSL head, fusion encoder, MLM and ITM heads) stay behind: open_clip models are dual encoders.
Configurations open_clip cannot express are refused with the reason (``OpenClipIncompatible``). Nothing here
imports open_clip: the folder layout follows open_clip 3.x (``model_cfg`` / ``preprocess_cfg`` in
``open_clip_config.json``, weights in ``open_clip_model.safetensors``).

A grayscale tower (``data.in_chans=1``) becomes an RGB one, since open_clip feeds RGB: its first convolution
is spread over R, G and B with the luma weights PIL uses for ``convert("L")``, so on any image it computes
what the grayscale tower computes on the image's luma (exactly so on grayscale images, whose channels are
equal); the normalisation mean and std are repeated per channel.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from unimlip_train.config.schema import Config
from unimlip_train.data.transforms import normalisation
from unimlip_train.export.load import load_for_eval

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
#: ITU-R BT.601 luma, the weights of PIL's ``convert("L")``.
LUMA = (0.299, 0.587, 0.114)
#: our parameter prefixes -> open_clip's (TimmModel: trunk + head.proj; HFTextEncoder: transformer + proj)
_PREFIXES = (("image_tower.model.", "visual.trunk."), ("image_proj.", "visual.head.proj."),
             ("text_tower.model.", "text.transformer."), ("text_proj.", "text.proj."))
#: model.text.pooling -> open_clip's hf_pooler_type
_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
#: encoder types open_clip's HFTextEncoder sizes from its own table (open_clip/hf_configs.py)
_HF_TEXT_TYPES = ("bert", "roberta", "xlm-roberta")
#: text-tower config overrides that change no weight: with only these, a hub text tower keeps its hub id
_WEIGHTLESS_TEXT_KEYS = {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"}


class OpenClipIncompatible(ValueError):
    """The checkpoint's configuration has no open_clip equivalent; the message says which key and why."""


def _first_conv_keys(trunk: torch.nn.Module) -> list[str]:
    names = trunk.pretrained_cfg.get("first_conv") or []
    return [f"{n}.weight" for n in ([names] if isinstance(names, str) else names)]


def _reference_trunk(name: str) -> torch.nn.Module:
    """The image trunk as open_clip builds it (``timm.create_model(name)``, classifier removed), shapes only."""
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False)
        trunk.reset_classifier(0)
    return trunk


def _reference_text_keys(hf_config: Any) -> dict[str, torch.Size]:
    """Parameter shapes of the text transformer as open_clip builds it (``AutoModel.from_config``, no pooler)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in AutoModel.from_config(hf_config, add_pooling_layer=False).state_dict().items()}


def _check_config(cfg: Config, hf_config: Any) -> None:
    if cfg.model.projection != "linear":
        raise OpenClipIncompatible(
            f"model.projection={cfg.model.projection!r}: open_clip's MLP heads (timm: hidden 2 x embed_dim; Hugging "
            "Face: bias-free, hidden (width + embed_dim) / 2) differ from ours; only 'linear' projections export")
    if cfg.model.image.kwargs:
        raise OpenClipIncompatible(
            f"model.image.kwargs={cfg.model.image.kwargs}: open_clip builds timm image towers as "
            f"timm.create_model({cfg.model.image.name!r}) with no extra arguments")
    if hf_config.model_type not in _HF_TEXT_TYPES:
        raise OpenClipIncompatible(f"text tower type {hf_config.model_type!r}: open_clip's Hugging Face text "
                                   f"tower supports {', '.join(_HF_TEXT_TYPES)} encoders here")


def _image_weights(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """``visual.trunk.*`` in open_clip's RGB layout, checked against the trunk open_clip will build."""
    reference = _reference_trunk(cfg.model.image.name)
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    if cfg.data.in_chans == 1:
        luma = torch.tensor(LUMA).view(1, 3, 1, 1)
        for key in _first_conv_keys(reference):
            if key in trunk and trunk[key].shape[1] == 1:
                trunk[key] = trunk[key] * luma.to(trunk[key].dtype)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    got = {k: v.shape for k, v in trunk.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) + sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])
        detail = ", ".join(f"{k} ours {tuple(got[k]) if k in got else 'absent'} vs open_clip "
                           f"{tuple(expected[k]) if k in expected else 'absent'}" for k in diff[:3])
        raise OpenClipIncompatible(
            f"model.image.name={cfg.model.image.name!r} at data.image_size={cfg.data.image_size}: open_clip builds "
            f"the timm tower at the model's default input size {reference.pretrained_cfg.get('input_size')}, "
            f"so the weights do not fit ({detail})")
    return {f"visual.trunk.{k}": v for k, v in trunk.items()}


def _text_weights(state: dict[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """``text.transformer.*`` (BERT's unused pooler dropped), checked against the transformer open_clip builds."""
    expected = _reference_text_keys(hf_config)
    text = {k[len("text.transformer."):]: v for k, v in state.items() if k.startswith("text.transformer.")}
    text = {k: v for k, v in text.items() if not (k.startswith("pooler.") and k not in expected)}
    got = {k: v.shape for k, v in text.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected))[:3]
        raise OpenClipIncompatible(f"the text tower's parameters differ from the {hf_config.model_type} open_clip "
                                   f"builds from its config: {', '.join(diff)}")
    return {f"text.transformer.{k}": v for k, v in text.items()}


def open_clip_weights(model: Any, cfg: Config, hf_config: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip's state dict of ``model`` and the names of our modules left behind (training-only heads)."""
    state, left = {}, set()
    for name, tensor in model.state_dict().items():
        for ours, theirs in _PREFIXES:
            if name.startswith(ours):
                state[theirs + name[len(ours):]] = tensor.detach().float().clone().contiguous()
                break
        else:
            if name.startswith(("image_tower.", "text_tower.")):
                raise OpenClipIncompatible(f"tower parameter {name} has no place in open_clip's towers")
            if name != "logit_scale":
                left.add(name.split(".")[0])
    weights = {**_image_weights(state, cfg), **_text_weights(state, hf_config),
               "visual.head.proj.weight": state["visual.head.proj.weight"], "text.proj.weight": state["text.proj.weight"]}
    # forward() clamps the learnable log-scale; open_clip clamps only while training, so export the clamped value
    weights["logit_scale"] = model.logit_scale.detach().float().clamp(max=math.log(cfg.model.max_logit_scale)).reshape(())
    return weights, sorted(left)


def _hf_model_name(cfg: Config, hf_config: Any, tokenizer: Any, out: str) -> str:
    """Where open_clip reads the text tower's config: the hub id of a hub text tower whose config we did not
    change (portable, as BiomedCLIP does), otherwise this folder's ``config.json`` by absolute path."""
    name = cfg.model.text.name
    portable = (name and not os.path.exists(os.path.expanduser(name))
                and set(cfg.model.text.config) <= _WEIGHTLESS_TEXT_KEYS and hf_config.pad_token_id == tokenizer.pad_token_id)
    return name if portable else os.path.abspath(out)


def export_open_clip(checkpoint: str, out: str) -> dict:
    """Write ``open_clip_config.json``, ``open_clip_model.safetensors``, the text tower's ``config.json`` and the
    tokenizer into ``out``; returns the written config (with what was left behind under ``unimlip``)."""
    model, cfg, tokenizer = load_for_eval(checkpoint)
    hf_config = model.text_tower.model.config
    _check_config(cfg, hf_config)
    hf_name = _hf_model_name(cfg, hf_config, tokenizer, out)
    hf_config.pad_token_id = tokenizer.pad_token_id  # open_clip derives the attention mask from it
    weights, left = open_clip_weights(model, cfg, hf_config)
    chans = cfg.data.in_chans
    mean, std = normalisation(cfg.data)  # a pretrained tower's own statistics, else CLIP's
    config = {
        "model_cfg": {
            "embed_dim": cfg.model.embed_dim,
            "vision_cfg": {"timm_model_name": cfg.model.image.name, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "timm_proj_bias": False, "image_size": cfg.data.image_size},
            "text_cfg": {"hf_model_name": hf_name, "hf_tokenizer_name": hf_name, "hf_model_pretrained": False,
                         "hf_proj_type": "linear", "hf_pooler_type": _POOLERS[cfg.model.text.pooling],
                         "context_length": cfg.data.text.max_length},
            "init_logit_scale": float(weights["logit_scale"]),
        },
        "preprocess_cfg": {"size": cfg.data.image_size, "mean": list(mean * (3 // chans)),
                           "std": list(std * (3 // chans)), "interpolation": "bicubic", "resize_mode": "shortest"},
        "unimlip": {"source": os.path.abspath(checkpoint), "config_hash": cfg.hash(), "in_chans": chans,
                    "left_behind": left},
    }
    os.makedirs(out, exist_ok=True)
    save_file(weights, os.path.join(out, WEIGHTS_FILE), metadata={"source": os.path.abspath(checkpoint)})
    hf_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return config
