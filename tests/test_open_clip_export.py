"""``unimlip-export --format open_clip``: open_clip loads the folder and computes our embeddings (tiny models,
real chest X-rays and real reports), and configurations open_clip cannot express are refused with the reason."""
from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import IU_REPORTS_TGZ, PNEUMONIAMNIST_NPZ
from unimlip_train.cli.export import main as export_main
from unimlip_train.config.load import dump_yaml, load_config
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.export import load_for_eval
from unimlip_train.export.open_clip_export import LUMA
from unimlip_train.models.build import build_model

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _exported_model(root: Path, overrides: list[str]) -> Path:
    """A safetensors export of a tiny random model whose every weight and BatchNorm statistic is perturbed, so
    a parameter or buffer open_clip failed to load would show in the embeddings."""
    cfg = load_config(TINY, ["data.num_workers=0", *overrides])
    tok = load_tokenizer("")
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_().add_(0.1)
    root.mkdir(parents=True)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    (root / "config.yaml").write_text(dump_yaml(cfg))
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def _reports(n: int) -> list[str]:
    out = []
    with tarfile.open(IU_REPORTS_TGZ) as tar:
        for member in tar:
            if member.name.endswith(".xml"):
                sec = {a.get("Label"): (a.text or "").strip() for a in ET.fromstring(tar.extractfile(member).read())
                       .iter("AbstractText")}
                if sec.get("FINDINGS") and sec.get("IMPRESSION"):
                    out.append(f"{sec['IMPRESSION']} {sec['FINDINGS']}")
            if len(out) == n:
                return out
    raise AssertionError("not enough reports")


@pytest.mark.parametrize("overrides", [
    [],  # the tiny config: timm resnet10t at 64 px, grayscale, BERT with CLS pooling
    ["model.image.name=vit_tiny_patch16_224", "data.image_size=224", "model.text.pooling=mean"],
], ids=["tiny_cpu", "vit_mean_pooling"])
def test_open_clip_loads_the_export_and_gives_our_embeddings(tmp_path, capsys, overrides):
    src = _exported_model(tmp_path / "src", overrides)
    out = tmp_path / "open_clip"
    assert export_main([str(src), "--format", "open_clip", "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # the training-only parts are named as left behind
    assert "fusion" in printed and "mlm_head" in printed
    ours, cfg, tok = load_for_eval(str(src))

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    assert type(theirs).__name__ == "CustomTextCLIP"
    assert type(theirs.visual).__name__ == "TimmModel" and type(theirs.text).__name__ == "HFTextEncoder"

    texts = _reports(6)
    ids = open_clip.get_tokenizer(f"local-dir:{out}")(texts)
    tokens = tok(texts, padding="max_length", truncation=True, max_length=cfg.data.text.max_length,
                 return_tensors="pt")
    assert torch.equal(ids, tokens["input_ids"])

    npz = np.load(PNEUMONIAMNIST_NPZ)
    xrays = [Image.fromarray(npz["val_images"][i]) for i in range(4)]  # grayscale 28 x 28
    rgb = torch.stack([preprocess(im) for im in xrays])  # open_clip's own eval preprocessing: RGB, resized
    assert rgb.shape == (4, 3, cfg.data.image_size, cfg.data.image_size)
    # A colour image: the grayscale tower sees its luma (normalisation is the same on every channel).
    colour = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(2))
    luma = (torch.tensor(LUMA).view(1, 3, 1, 1) * colour).sum(1, keepdim=True)
    with torch.no_grad():
        text_ours = ours.encode_text(tokens["input_ids"], tokens["attention_mask"])
        text_theirs = theirs.encode_text(ids, normalize=True)
        image_ours = ours.encode_image(torch.cat([rgb[:, :1], luma]))
        image_theirs = theirs.encode_image(torch.cat([rgb, colour]), normalize=True)
        ids4, mask4 = tokens["input_ids"][:4], tokens["attention_mask"][:4]
        scale_ours = ours({"image": rgb[:, :1], "input_ids": ids4, "attention_mask": mask4, "image_view2": rgb[:, :1],
                           "text_view2_ids": ids4, "text_view2_mask": mask4, "mlm_input_ids": ids4,
                           "mlm_labels": ids4})["logit_scale"]  # the temperature our forward uses
    assert torch.allclose(rgb[:, 0], rgb[:, 1]) and torch.allclose(rgb[:, 0], rgb[:, 2])
    assert (text_ours - text_theirs).abs().max() < 1e-4
    assert (image_ours - image_theirs).abs().max() < 1e-4
    assert theirs.logit_scale.exp().item() == pytest.approx(scale_ours.item(), rel=1e-6)
    # Not trivially equal: different inputs give different embeddings.
    assert (text_theirs[0] - text_theirs[1]).abs().max() > 1e-2 and (image_theirs[0] - image_theirs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("overrides, reason", [
    (["model.projection=mlp"], r"model\.projection='mlp': open_clip's MLP heads"),
    (["model.image.name=vit_tiny_patch16_224", "model.image.kwargs={patch_size: 8, embed_dim: 32, depth: 1, "
      "num_heads: 2}"], r"model\.image\.kwargs=.*timm\.create_model\('vit_tiny_patch16_224'\) with no extra"),
    (["model.image.name=vit_tiny_patch16_224", "data.image_size=32"],
     r"data\.image_size=32: open_clip builds the timm tower at the model's default input size \(3, 224, 224\).*"
     r"pos_embed ours \(1, 5, 192\) vs open_clip \(1, 197, 192\)"),
], ids=["mlp_projection", "timm_kwargs", "vit_image_size"])
def test_configurations_open_clip_cannot_express_are_refused(tmp_path, capsys, overrides, reason):
    src = _exported_model(tmp_path / "src", ["loss.mlm.weight=0", "loss.itm.weight=0", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(src), "--format", "open_clip", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("unimlip-export: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(reason, err), err
    assert not (tmp_path / "out").exists()

