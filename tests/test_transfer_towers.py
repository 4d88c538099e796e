"""Pretrained towers (local timm folders/files, timm tags, missing weights), locking (LiT / open_clip groups) and
layer-wise lr decay, in one process. The end-to-end check (a locked tower bit-identical to its file after
training) is in test_finetune.py, which trains a checkpoint anyway."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from unimlip_tiny import IMAGE_SIZE, tiny_config, tiny_tokenizer
from unimlip_train.config.load import load_config
from unimlip_train.config.origins import ConfigError
from unimlip_train.engine.optim import group_lrs, param_groups
from unimlip_train.models.build import build_model
from unimlip_train.models.pretrained import resolve_towers

REPO = Path(__file__).resolve().parent.parent
VIT = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
TEXT = ("{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
        "max_position_embeddings: 64}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


def _vit_overrides(folder: Path, *extra: str) -> list[str]:
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in VIT.items()) + "}"
    return ["model.image.name=vit_tiny_patch16_224", f"model.image.pretrained={folder}",
            f"model.image.kwargs={kwargs}", f"model.text.config={TEXT}", "model.embed_dim=16", *extra]


def test_a_timm_folder_brings_its_weights_normalisation_and_input_size(tokenizer, tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=3, img_size=48, **VIT)
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": (0.2, 0.3, 0.4), "std": (0.1, 0.2, 0.3),
                             "input_size": (3, 48, 48)}
    save_for_hf(source, tmp_path / "vit", safe_serialization=True)  # the layout unimlip-fetch-weights writes

    cfg = load_config(None, _vit_overrides(tmp_path / "vit", "data.in_chans=3"), resolve=resolve_towers)
    assert cfg.data.mean == pytest.approx([0.2, 0.3, 0.4]) and cfg.data.std == pytest.approx([0.1, 0.2, 0.3])
    assert cfg.data.image_size == 48  # from the weights' config, not the schema default 224
    gray = load_config(None, _vit_overrides(tmp_path / "vit", "data.in_chans=1", "data.image_size=32"),
                       resolve=resolve_towers)
    assert gray.data.mean == pytest.approx([0.3]) and gray.data.std == pytest.approx([0.2])  # channel averages
    assert gray.data.image_size == 32  # an explicit size wins

    model = build_model(cfg, tokenizer)
    for name, value in source.state_dict().items():
        assert torch.equal(model.image_tower.model.state_dict()[name], value), name

    # The loader normalises with those statistics: a real shard of a constant image, read back.
    from data_prep.options import WriterOptions
    from data_prep.writer import write_shards
    from unimlip_train.data.eval_loader import build_eval_loader
    from unimlip_train.format.rows import Row

    Image.fromarray(np.full((60, 60), 100, np.uint8)).save(tmp_path / "flat.png")
    write_shards([Row(id="flat", image=str(tmp_path / "flat.png"), text="No finding.")], tmp_path / "shards",
                 WriterOptions(val_fraction=0.0, workers=1), "test", {}, progress=False)
    cfg.data.num_workers = 0
    batch = next(iter(build_eval_loader(cfg, str(tmp_path / "shards"), tokenizer, 1, 0, 1, split="train")))
    assert batch["image"].shape == (1, 3, 48, 48)
    for c, (m, s) in enumerate(zip((0.2, 0.3, 0.4), (0.1, 0.2, 0.3))):
        assert torch.allclose(batch["image"][0, c], torch.full((48, 48), (100 / 255 - m) / s), atol=2 / 255 / s)


def test_a_weights_file_takes_the_tag_config_and_bad_values_fail_at_load_naming_the_key(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "r10.pth")
    cfg = load_config(None, ["model.image.name=resnet10t.c3_in1k", f"model.image.pretrained={tmp_path / 'r10.pth'}",
                             "data.in_chans=3"], resolve=resolve_towers)
    tag = timm.models.get_pretrained_cfg("resnet10t.c3_in1k")
    assert cfg.data.mean == pytest.approx(tag.mean) and cfg.data.image_size == tag.input_size[-1] == 176
    # the production config: ViT-B/16 in21k->in1k from the hub, normalisation 0.5 and 224 px, nothing downloaded
    prod = load_config(str(REPO / "configs" / "vitb16_biomedbert.yaml"), resolve=resolve_towers)
    assert prod.model.image.pretrained == "hub"
    assert prod.data.mean == prod.data.std == [0.5, 0.5, 0.5] and prod.data.image_size == 224

    for overrides, needles in [
        ([f"model.image.pretrained={tmp_path / 'missing'}"], ["model.image.pretrained", "no such file",
                                                              "timm/vit_tiny_patch16_224", "unimlip-fetch-weights"]),
        (["model.image.name=resnet10t.nosuchtag", "model.image.pretrained=hub"], ["model.image.name", "nosuchtag"]),
        ([f"model.image.pretrained={tmp_path}"], ["no weights file", "model.safetensors"]),
        (["model.image.lock_unlocked_groups=2"], ["model.image.lock_unlocked_groups", "model.image.lock"]),
        (["model.text.lock=true", "model.text.lock_unlocked_groups=-1"], ["model.text.lock_unlocked_groups"]),
        (["train.layer_decay=0"], ["train.layer_decay"]),
        (["data.mean=[0.5]", "data.std=[0.5]", "data.in_chans=3"], ["data.mean", "3 numbers"]),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides, resolve=resolve_towers)
        assert all(n in str(err.value) for n in needles), (str(err.value), needles)
        assert "command line" in str(err.value)


def test_missing_hub_weights_offline_give_one_line_naming_the_key(tmp_path):
    """A fresh, empty Hugging Face cache and HF_HUB_OFFLINE=1: building the towers and fetching both fail with one
    line naming the key and the download, not a traceback."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    script = """
from unimlip_train.config.load import load_config
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.models.image_tower import ImageTower
from unimlip_train.models.pretrained import resolve_towers
from unimlip_train.models.text_tower import TextTower
cfg = load_config(None, ["model.image.name=resnet10t.c3_in1k", "model.image.pretrained=hub",
                         "model.text.name=microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"],
                  resolve=resolve_towers)
for build in (lambda: ImageTower(cfg), lambda: TextTower(cfg, load_tokenizer())):
    try:
        build()
    except FileNotFoundError as e:
        print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    image_line, text_line = out.stdout.strip().splitlines()
    assert image_line.startswith(
        "model.image.pretrained=hub: cannot load timm resnet10t (hub id timm/resnet10t.c3_in1k)")
    assert text_line.startswith("model.text.name=microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext: ")
    for line in (image_line, text_line):
        assert "unimlip-fetch-weights CONFIG --out DIR" in line and "Hugging Face cache" in line

    fetch = subprocess.run([sys.executable, "-m", "unimlip_train.cli.fetch_weights",
                            str(REPO / "configs" / "vitb16_biomedbert.yaml"), "--out", str(tmp_path / "w")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert fetch.returncode == 1 and "Traceback" not in fetch.stderr
    assert fetch.stderr.strip().startswith("unimlip-fetch-weights: cannot download") and "internet" in fetch.stderr
    local = subprocess.run([sys.executable, "-m", "unimlip_train.cli.fetch_weights",
                            str(REPO / "configs" / "tiny_cpu.yaml"), "--out", str(tmp_path / "w")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and "nothing to fetch" in local.stdout


def _trainable(module: torch.nn.Module) -> set:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_a_locked_tower_is_frozen_in_eval_mode_and_the_optimizer_skips_it(tokenizer):
    cfg = tiny_config()
    cfg.model.image.name, cfg.model.image.kwargs = "resnet10t", {}
    cfg.model.image.lock = True
    model = build_model(cfg, tokenizer)
    model.train()
    tower = model.image_tower
    assert not _trainable(tower) and not any(m.training for m in tower.model.modules())
    assert model.training and model.text_tower.training  # the rest trains
    bn = tower.model.conv1[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        first = tower(x)[0]
        assert torch.equal(first, tower(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    grouped = {id(p) for g in param_groups(model, model, cfg) for p in g["params"]}
    assert not grouped & {id(p) for p in tower.parameters()}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}

    # dropout inside a locked ViT is off in training mode; unlocked it is on (the reference)
    outputs = {}
    for lock in (False, True):
        cfg = tiny_config()
        cfg.model.image.kwargs = {**cfg.model.image.kwargs, "drop_rate": 0.5, "attn_drop_rate": 0.5}
        cfg.model.image.lock = lock
        tower = build_model(cfg, tokenizer).image_tower.train()
        torch.manual_seed(0)
        outputs[lock] = [tower(x)[0] for _ in range(2)]
    assert not torch.equal(*outputs[False]) and torch.equal(*outputs[True])


def test_partial_locks_follow_open_clip_groups(tokenizer):
    cfg = tiny_config()
    cfg.model.image.kwargs = {**VIT, "depth": 3}
    cfg.model.image.lock, cfg.model.image.lock_unlocked_groups = True, 1
    cfg.model.text.lock, cfg.model.text.lock_unlocked_groups = True, 1
    model = build_model(cfg, tokenizer).train()
    image, text = model.image_tower, model.text_tower
    # timm's ViT groups: stem, blocks.0 .. blocks.2 with the final norm joining the last block
    last = ("model.blocks.2.", "model.norm.")
    assert _trainable(image) == {n for n, _ in image.named_parameters() if n.startswith(last)}
    assert not image.model.blocks[0].training and not image.model.patch_embed.training
    assert image.model.blocks[2].training
    # open_clip's text rule: embeddings and all but the last N encoder layers frozen
    assert _trainable(text) == {n for n, _ in text.named_parameters() if n.startswith("model.encoder.layer.1.")}
    assert not text.model.embeddings.training and text.model.encoder.layer[1].training

    cfg.model.image.lock_unlocked_groups = 4  # stem + 3 blocks: 4 groups, nothing would stay locked
    with pytest.raises(ValueError, match="model.image.lock_unlocked_groups=4: the tower has 4 layer groups"):
        build_model(cfg, tokenizer)


def test_layer_decay_matches_the_depth_of_each_parameter(tokenizer):
    cfg = tiny_config()
    cfg.model.image.kwargs = {**VIT, "depth": 3}
    cfg.train.layer_decay, cfg.train.lr, cfg.train.lr_image, cfg.train.lr_text = 0.5, 1e-3, 4e-4, 2e-4
    model = build_model(cfg, tokenizer)
    groups = param_groups(model, model, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}

    def image_depth(name: str) -> int:  # naive: stem 0, block i at i + 1, the final norm with the last block
        if name.startswith("model.blocks."):
            return int(name.split(".")[2]) + 1
        return 3 if name.startswith("model.norm.") else 0

    def text_depth(name: str) -> int:
        return int(name.split(".")[3]) + 1 if name.startswith("model.encoder.layer.") else 0

    for name, p in model.image_tower.named_parameters():
        assert lr_of[id(p)] == pytest.approx(4e-4 * 0.5 ** (3 + 1 - image_depth(name))), name
    for name, p in model.text_tower.named_parameters():
        assert lr_of[id(p)] == pytest.approx(2e-4 * 0.5 ** (2 + 1 - text_depth(name))), name
    assert lr_of[id(model.image_proj.weight)] == lr_of[id(model.logit_scale)] == 1e-3
    optimizer = torch.optim.AdamW(groups)
    assert group_lrs(optimizer) == pytest.approx({"image": 4e-4, "text": 2e-4, "head": 1e-3, "temperature": 1e-3})
