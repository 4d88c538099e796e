"""Every loss term against a naive reference written here with Python loops, single process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unimlip_tiny import random_batch, tiny_config, tiny_tokenizer
from unimlip_train.losses import UniMlipObjective, contrastive_loss, nt_xent, sample_hard_negatives
from unimlip_train.models import build_model


def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(u, v))


def naive_infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    n = len(a)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * dot(x[i], y[j]) for j in range(n)]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = list(z1) + list(z2)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denom = sum(math.exp(dot(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -dot(z[i], z[positive]) / temperature + math.log(denom)
    return total / (2 * n)


def test_contrastive_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    a, b = unit_rows(7, 5, g), unit_rows(7, 5, g)
    got = contrastive_loss(a, b, torch.tensor([4.0]))
    assert got.item() == pytest.approx(naive_infonce(a, b, 4.0), rel=1e-6)
    # a scalar (0-dim) multiplier works the same
    assert contrastive_loss(a, b, torch.tensor(4.0)).item() == pytest.approx(got.item(), rel=1e-6)


def test_nt_xent_matches_loops():
    g = torch.Generator().manual_seed(1)
    z1, z2 = unit_rows(6, 4, g), unit_rows(6, 4, g)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(naive_nt_xent(z1, z2, 0.3), rel=1e-6)


def test_hard_negative_sampling_follows_softmax_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, generator=g)  # rows 0..3 have their positive at column row + 1
    draws = torch.stack([sample_hard_negatives(logits, 1, seed=3, step=s, stream=0) for s in range(3000)])
    for i in range(4):
        positive = i + 1
        assert not (draws[:, i] == positive).any()
        others = [j for j in range(5) if j != positive]
        z = sum(math.exp(float(logits[i, j])) for j in others)
        for j in others:
            expected = math.exp(float(logits[i, j])) / z
            observed = float((draws[:, i] == j).float().mean())
            assert abs(observed - expected) < 0.035, (i, j, observed, expected)
    again = sample_hard_negatives(logits, 1, seed=3, step=17, stream=0)
    assert torch.equal(again, draws[17])
    streams = torch.stack([sample_hard_negatives(logits, 1, seed=3, step=s, stream=1) for s in range(50)])
    seeds = torch.stack([sample_hard_negatives(logits, 1, seed=4, step=s, stream=0) for s in range(50)])
    assert not torch.equal(streams, draws[:50]) and not torch.equal(seeds, draws[:50])


def fake_outputs(n: int, g: torch.Generator) -> dict:
    keys = ["image_emb", "text_emb", "image_emb_feat", "text_emb_feat", "text_emb_feat2", "image_ssl_feat1",
            "image_ssl_feat2", "image_ssl_1", "image_ssl_2", "text_view2_emb"]
    out = {k: unit_rows(n, 8, g).float() for k in keys}
    out["logit_scale"] = torch.tensor(3.0)
    return out


def test_objective_terms_and_weighted_total():
    g = torch.Generator().manual_seed(3)
    cfg = tiny_config(mlm=0.0, itm=0.0, itc=2.0, text_ssl=0.5)
    cfg.loss.image_ssl.temperature = 0.2
    cfg.loss.text_feature.temperature = 0.05
    out = fake_outputs(5, g)
    logs = UniMlipObjective(cfg)({}, out, None, step=0)
    uni = ("image_ssl", "image_feature", "text_ssl", "text_feature")
    t = {name: getattr(cfg.loss, name).temperature for name in uni}
    want = {
        "itc": naive_infonce(out["image_emb"], out["text_emb"], 3.0),
        "itc_feature": naive_infonce(out["image_emb_feat"], out["text_emb_feat"], 3.0),
        "image_ssl": naive_nt_xent(out["image_ssl_1"], out["image_ssl_2"], t["image_ssl"]),
        "image_feature": naive_nt_xent(out["image_ssl_feat1"], out["image_ssl_feat2"], t["image_feature"]),
        "text_ssl": naive_nt_xent(out["text_emb"], out["text_view2_emb"], t["text_ssl"]),
        "text_feature": naive_nt_xent(out["text_emb_feat"], out["text_emb_feat2"], t["text_feature"]),
    }
    assert set(logs) == set(want) | {"loss"}
    for name, value in want.items():
        assert logs[name].item() == pytest.approx(value, rel=1e-5), name
    total = sum(getattr(cfg.loss, name).weight * value for name, value in want.items())
    assert logs["loss"].item() == pytest.approx(total, rel=1e-5)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0)
    model = build_model(cfg, tiny_tokenizer(tmp_path_factory.mktemp("vocab"))).eval()
    batch = random_batch(6, 9, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(batch)
    return cfg, model, batch, out


def test_mlm_matches_loops(fused):
    cfg, model, batch, out = fused
    got = UniMlipObjective(tiny_config(**{n: 0.0 for n in ("itc", "itc_feature", "image_ssl", "image_feature",
                                                          "text_ssl", "text_feature", "itm")}))
    with torch.no_grad():
        value = got(batch, out, model, step=0)["mlm"].item()
        states = model.fuse(out["mlm_tokens"], batch["attention_mask"], out["image_tokens"])
        losses = []
        for i in range(states.shape[0]):
            for j in range(states.shape[1]):
                label = int(batch["mlm_labels"][i, j])
                if label != -100:
                    logits = model.mlm_head(states[i, j]).double()
                    losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
    assert len(losses) > 3
    assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_itm_hard_negatives_matches_loops(fused):
    cfg, model, batch, out = fused
    n = out["image_emb"].shape[0]
    # a huge scale makes softmax sampling pick the hardest negative, which a loop can find
    out = {**out, "logit_scale": torch.tensor(1e6)}
    objective = UniMlipObjective(tiny_config(**{n: 0.0 for n in ("itc", "itc_feature", "image_ssl", "image_feature",
                                                                 "text_ssl", "text_feature", "mlm")}))

    def hardest(x: torch.Tensor, y: torch.Tensor, i: int) -> int:
        sims = [(dot(x[i], y[j]), j) for j in range(n) if j != i]
        return max(sims)[1]

    with torch.no_grad():
        value = objective(batch, out, model, step=5)["itm"].item()
        mask, text, image = batch["attention_mask"], out["text_tokens"], out["image_tokens"]
        losses = []
        for i in range(n):
            jt = hardest(out["image_emb"], out["text_emb"], i)
            ji = hardest(out["text_emb"], out["image_emb"], i)
            for t, m, im, label in ((i, i, i, 1), (jt, jt, i, 0), (i, i, ji, 0)):
                fused_cls = model.fuse(text[t:t + 1], mask[m:m + 1], image[im:im + 1])[0, 0]
                logits = model.itm_head(fused_cls).double()
                losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
    assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("term,key", [("image_ssl", "image_view2"), ("text_ssl", "text_view2_ids"),
                                      ("mlm", "mlm_labels")])
def test_missing_input_names_term_and_key(fused, term, key):
    _, model, batch, _ = fused
    incomplete = {k: v for k, v in batch.items() if k != key}
    with pytest.raises(KeyError, match=f"'{term}'.*'{key}'"):
        model(incomplete)
