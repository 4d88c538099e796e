"""The Uni-Mlip model: towers, heads, temperature, outputs, local weights, and learning on CPU."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from unimlip_tiny import IMAGE_SIZE, NUM_WORDS, SPECIAL, random_batch, tiny_config, tiny_tokenizer
from unimlip_train.losses.contrastive import nt_xent
from unimlip_train.losses.objective import UniMlipObjective
from unimlip_train.models.build import TrainStep, build_model

ALL_OUTPUTS = {
    "image_emb", "text_emb", "logit_scale", "image_tokens", "text_tokens", "text_mask", "image_emb_feat",
    "text_emb_feat", "image_feature_1", "image_feature_2", "text_feature_1", "text_feature_2", "image_ssl_1",
    "image_ssl_2", "text_ssl_1", "text_ssl_2", "mlm_tokens",
}
OFF_BUT_ITC = {n: 0.0 for n in ("itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


def test_outputs_shapes_and_temperature(tokenizer):
    cfg = tiny_config()
    model = build_model(cfg, tokenizer)
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    batch = random_batch(4, 9, torch.Generator().manual_seed(0))
    out = model(batch)
    assert set(out) == ALL_OUTPUTS
    for key in ("image_emb", "text_emb", "image_emb_feat", "text_emb_feat"):
        assert out[key].shape == (4, 32) and torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=1e-5), key
    for key in ("image_ssl_1", "text_ssl_1", "text_ssl_2"):
        assert out[key].shape == (4, cfg.model.ssl_embed_dim), key
    assert out["image_tokens"].shape == (4, (IMAGE_SIZE // 8) ** 2 + 1, 64)
    assert out["text_tokens"].shape == out["mlm_tokens"].shape == (4, 9, 64)
    assert torch.allclose(model.encode_image(batch["image"]), out["image_emb"], atol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # not clamped in forward: the gradient must not vanish
    loss, logs = TrainStep(model, UniMlipObjective(cfg))(batch, step=0)
    assert logs["temperature"].item() == pytest.approx(0.001)
    assert torch.isfinite(loss) and logs["loss"].item() == pytest.approx(loss.item())
    loss.backward()
    assert model.logit_scale.grad.abs().item() > 0
    model.clamp_logit_scale_(lambda p, lo, hi: p.data.clamp_(lo, hi))  # after the optimizer step: [ln 1, ln 100]
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_heads_exist_only_for_enabled_terms(tokenizer):
    model = build_model(tiny_config(**OFF_BUT_ITC), tokenizer)
    names = {n for n, _ in model.named_children()}
    assert names == {"image_tower", "text_tower", "image_proj", "text_proj"}
    batch = random_batch(3, 7, torch.Generator().manual_seed(1))
    for key in ("image_view2", "text_view2_ids", "text_view2_mask", "mlm_input_ids", "mlm_labels"):
        del batch[key]  # not needed when only itc is on
    assert set(model(batch)) == {"image_emb", "text_emb", "logit_scale", "image_tokens", "text_tokens", "text_mask"}
    mlp = build_model(tiny_config(**{**OFF_BUT_ITC, "itm": 1.0}), tokenizer)
    assert {"fusion", "itm_head"} <= {n for n, _ in mlp.named_children()}


def test_text_ssl_space(tokenizer):
    """text_ssl contrasts in the text SSL head's space by default, in the shared space when asked."""
    batch = random_batch(3, 7, torch.Generator().manual_seed(2))
    only_text_ssl = {**OFF_BUT_ITC, "text_ssl": 1.0}
    torch.manual_seed(0)
    head = build_model(tiny_config(**only_text_ssl), tokenizer).eval()
    with torch.no_grad():
        out = head(batch)
        pooled = head.text_tower(batch["text_view2_ids"], batch["text_view2_mask"])[0]
        assert torch.allclose(out["text_ssl_2"], torch.nn.functional.normalize(head.text_ssl_head(pooled), dim=-1))
    cfg = tiny_config(**only_text_ssl)
    cfg.loss.text_ssl_space = "shared"
    shared = build_model(cfg, tokenizer).eval()
    assert not hasattr(shared, "text_ssl_head")
    with torch.no_grad():
        out = shared(batch)
    assert torch.equal(out["text_ssl_1"], out["text_emb"])
    assert torch.allclose(out["text_ssl_2"], shared.encode_text(batch["text_view2_ids"], batch["text_view2_mask"]))


def test_mean_pooling_and_cnn_three_channels(tokenizer):
    cfg = tiny_config(**OFF_BUT_ITC)
    cfg.model.text.pooling = "mean"
    cfg.model.image.name, cfg.model.image.kwargs, cfg.data.in_chans = "resnet10t", {}, 3
    model = build_model(cfg, tokenizer).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    pooled, tokens = model.text_tower(ids, mask)
    for i in range(2):
        keep = [tokens[i, j] for j in range(5) if mask[i, j]]
        assert torch.allclose(pooled[i], sum(keep) / len(keep), atol=1e-6)
    image_pooled, image_tokens = model.image_tower(torch.randn(2, 3, 64, 64))
    assert image_pooled.shape == (2, 512) and image_tokens.shape == (2, 4, 512)  # 64 px / stride 32 = 2 x 2


def test_local_pretrained_weights(tokenizer, tmp_path):
    cfg = tiny_config(**OFF_BUT_ITC)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=IMAGE_SIZE,
                               **cfg.model.image.kwargs)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    bert = BertModel(BertConfig(vocab_size=len(SPECIAL) + NUM_WORDS, **cfg.model.text.config), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    for pretrained in (str(tmp_path / "model.safetensors"), str(tmp_path)):  # a file, then its folder
        cfg.model.image.pretrained = pretrained
        cfg.model.text.name, cfg.model.text.config = str(tmp_path / "bert"), {}
        model = build_model(cfg, tokenizer)
        for name, value in source.state_dict().items():
            assert torch.equal(model.image_tower.model.state_dict()[name], value), name
        for name, value in bert.state_dict().items():
            assert torch.equal(model.text_tower.model.state_dict()[name], value), name
    cfg.model.image.pretrained = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model.image.pretrained"):
        build_model(cfg, tokenizer)


def test_grad_checkpointing_gives_same_gradients(tokenizer):
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(dropout=0.0, **OFF_BUT_ITC)
        cfg.model.grad_checkpointing = checkpointing
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer).train()
        loss, _ = TrainStep(model, UniMlipObjective(cfg))(random_batch(4, 9, torch.Generator().manual_seed(2)), 0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def structured_batch(n: int, templates: torch.Tensor, g: torch.Generator) -> dict:
    """Images whose pixel pattern encodes a class that the report's class words also encode; two noisy
    views; the augmented report has other filler words; MLM masks one of the two class words."""
    classes = torch.randint(0, len(templates), (n,), generator=g)
    c = len(templates)
    filler = torch.randint(5 + 2 * c, 5 + NUM_WORDS, (n, 4), generator=g)
    filler2 = torch.randint(5 + 2 * c, 5 + NUM_WORDS, (n, 4), generator=g)
    ids = torch.cat([torch.full((n, 1), 2), (5 + classes)[:, None], (5 + c + classes)[:, None], filler,
                     torch.full((n, 1), 3)], dim=1)
    view2 = ids.clone()
    view2[:, 3:7] = filler2
    pos = 1 + torch.randint(0, 2, (n,), generator=g)
    rows = torch.arange(n)
    labels = torch.full_like(ids, -100)
    labels[rows, pos] = ids[rows, pos]
    masked = ids.clone()
    masked[rows, pos] = 4
    noise = lambda: 0.5 * torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # noqa: E731
    return {
        "image": templates[classes] + noise(), "image_view2": templates[classes] + noise(),
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "text_view2_ids": view2,
        "text_view2_mask": torch.ones_like(ids), "mlm_input_ids": masked, "mlm_labels": labels,
        "report_id": torch.unique(ids, dim=0, return_inverse=True)[1], "group_id": torch.arange(n),
    }


def test_every_term_learns_on_cpu(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.1)
    step_fn = TrainStep(build_model(cfg, tokenizer), UniMlipObjective(cfg)).train()
    optimizer = torch.optim.AdamW(step_fn.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(24, 1, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g).repeat_interleave(8, -1)
    templates = templates.repeat_interleave(8, -2)
    history = []
    for step in range(200):
        loss, logs = step_fn(structured_batch(16, templates, g), step)
        assert torch.isfinite(loss), (step, logs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in logs.items()})
    # in 200 steps ITM (hard negatives) only falls to about its label prior (1 positive : 2 negatives); the
    # other terms fall far (e.g. mlm 4.1 -> 0.3, itc 2.9 -> 1.6)
    for term in ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm", "loss"):
        first = sum(h[term] for h in history[:20]) / 20
        last = sum(h[term] for h in history[-20:]) / 20
        assert last < first, (term, first, last)


def _uniformity(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent without its alignment part: log-sum-exp over each anchor's negatives only (pure push-apart)."""
    z, n = torch.cat([z1, z2]), len(z1)
    excluded = torch.eye(2 * n, dtype=torch.bool)
    excluded[torch.arange(2 * n), torch.cat([torch.arange(n) + n, torch.arange(n)])] = True
    return torch.logsumexp((z @ z.T / temperature).masked_fill(excluded, float("-inf")), 1).mean()


def test_feature_level_perturbation_is_not_a_uniformity_penalty():
    """The tiny default (configs/tiny_cpu.yaml: ResNet-10-T, 2-layer BERT) at initialisation, on synthetic
    radiographs and their reports: for image_feature and text_feature, the mean cosine of the two "views" and
    the cosine between the term's tower gradient and the gradient of its uniformity part alone. Perturbing
    inside the encoders (spatial dropout of the CNN stages, BERT's own dropout) must make the term clearly
    more than a push-apart than dropout on the pooled vector does."""
    from data_prep.synthetic import generate
    from unimlip_train.config.load import load_config
    from unimlip_train.data.collate import _tokenize
    from unimlip_train.data.text import model_text
    from unimlip_train.data.tokenizer import load_tokenizer

    samples = list(generate(32, seed=0, size=64))
    tokenizer = load_tokenizer("")
    tok = _tokenize(tokenizer, [model_text(s.report) for s in samples], 48)
    images = torch.from_numpy(__import__("numpy").stack([s.image for s in samples])).float()[:, None] / 255
    batch = {"image": (images - 0.5) / 0.25, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
             "report_id": torch.arange(32)}
    results = {}
    for mode in ("pooled_dropout", "encoder"):
        cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"),
                          [f"loss.feature_perturbation={mode}", "loss.image_ssl.weight=0", "loss.text_ssl.weight=0",
                           "loss.mlm.weight=0"])
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer).train()
        for term, tower in (("image_feature", model.image_tower), ("text_feature", model.text_tower)):
            torch.manual_seed(1)
            out = model(batch)
            z1, z2 = out[f"{term}_1"], out[f"{term}_2"]
            temperature = getattr(cfg.loss, term).temperature
            params = [p for p in tower.parameters() if p.requires_grad]
            full = torch.autograd.grad(nt_xent(z1, z2, temperature), params, retain_graph=True, allow_unused=True)
            push = torch.autograd.grad(_uniformity(z1, z2, temperature), params, allow_unused=True)
            full, push = (torch.cat([g.flatten() for g in gs if g is not None]) for gs in (full, push))
            results[mode, term] = ((z1 * z2).sum(1).mean().item(), F.cosine_similarity(full, push, 0).item())
    for key, (view_cos, grad_cos) in results.items():
        print(f"{key[1]:14s} {key[0]:15s} positive-pair cosine {view_cos:.3f}  gradient cosine with uniformity {grad_cos:.3f}")
    for term in ("image_feature", "text_feature"):
        assert results["encoder", term][1] < results["pooled_dropout", term][1] - 0.3, term
    assert results["encoder", "image_feature"][0] < results["pooled_dropout", "image_feature"][0] - 0.1


@pytest.mark.parametrize("name, kwargs, size", [("vit_tiny_patch16_224", dict(depth=2, embed_dim=64, num_heads=2,
                                                                             patch_size=8), 32),
                                               ("resnet10t", {}, 64)])
def test_feature_perturbation_only_in_the_pass_that_asks_for_it(tokenizer, name, kwargs, size):
    """Patch dropout (ViT) / spatial dropout (CNN) changes the perturbed pass only, in train and in eval mode
    (a locked tower stays in eval mode), and ordinary passes before and after it are identical."""
    from unimlip_train.models.image_tower import ImageTower

    cfg = tiny_config(dropout=0.0)
    cfg.model.image.name, cfg.model.image.kwargs, cfg.data.image_size = name, kwargs, size
    cfg.model.image.token_drop, cfg.model.image.spatial_drop = 0.5, 0.3
    tower = ImageTower(cfg)
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        tower.train(mode)
        with torch.no_grad():
            clean = tower(x)[0]
            perturbed = tower(x, perturb=True)[0]
            again = tower(x)[0]
        assert torch.equal(clean, again) and not torch.allclose(clean, perturbed, atol=1e-3), (name, mode)
