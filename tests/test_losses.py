"""Every loss term against a naive reference written here with Python loops, single process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unimlip_tiny import random_batch, tiny_config, tiny_tokenizer
from unimlip_train.data.collate import label_id
from unimlip_train.losses.contrastive import contrastive_loss, nt_xent, sigmoid_loss, uniformity_loss
from unimlip_train.losses.hard_negatives import gumbel_noise, sample_hard_negatives
from unimlip_train.losses.objective import UniMlipObjective
from unimlip_train.models.build import build_model


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


def naive_multi_positive(a: torch.Tensor, b: torch.Tensor, scale: float, ids: list) -> float:
    """InfoNCE where every column with the row's id is a positive, each with target 1 / (number of them)."""
    n = len(a)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * dot(x[i], y[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(n) if ids[j] == ids[i]]
            total += sum(log_z - logits[j] for j in positives) / len(positives)
    return total / (2 * n)


def naive_sigmoid(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float, ids: list) -> float:
    total = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total += math.log(1 + math.exp(-z * (scale * dot(a[i], b[j]) + bias)))
    return total / len(a)


def alike(a, b) -> bool:
    """Same identity: equal ids, or for tuples of ids any position equal."""
    return any(x == y for x, y in zip(a, b)) if isinstance(a, tuple) else a == b


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, ids: list | None = None) -> float:
    """Anchors are all 2n views; another sample alike the anchor is neither positive nor negative."""
    z = list(z1) + list(z2)
    n = len(z1)
    ids = list(range(n)) if ids is None else ids
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        candidates = [k for k in range(2 * n) if k == positive or not alike(ids[k % n], ids[i % n])]
        denom = sum(math.exp(dot(z[i], z[k]) / temperature) for k in candidates)
        total += -dot(z[i], z[positive]) / temperature + math.log(denom)
    return total / (2 * n)


def test_contrastive_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    a, b = unit_rows(7, 5, g), unit_rows(7, 5, g)
    got = contrastive_loss(a, b, torch.tensor([4.0]))
    assert got.item() == pytest.approx(naive_infonce(a, b, 4.0), rel=1e-6)
    # a scalar (0-dim) multiplier works the same
    assert contrastive_loss(a, b, torch.tensor(4.0)).item() == pytest.approx(got.item(), rel=1e-6)


def test_multi_positive_contrastive_loss_matches_loops():
    g = torch.Generator().manual_seed(10)
    a, b = unit_rows(8, 5, g), unit_rows(8, 5, g)
    ids = [3, 1, 3, 2, 1, 3, 7, 8]  # three samples share a report, two others another one
    got = contrastive_loss(a, b, torch.tensor([4.0]), ids=torch.tensor(ids))
    assert got.item() == pytest.approx(naive_multi_positive(a, b, 4.0, ids), rel=1e-6)
    # distinct ids are plain CLIP exactly; (n, 2) ids: the same when either column agrees
    assert contrastive_loss(a, b, torch.tensor(4.0), ids=torch.arange(8)).item() == pytest.approx(
        naive_infonce(a, b, 4.0), rel=1e-6)
    report, group = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), torch.tensor([9, 9, 5, 6, 7, 8, 10, 11])
    either = contrastive_loss(a, b, torch.tensor(4.0), ids=torch.stack([report, group], 1))
    assert either.item() == pytest.approx(naive_multi_positive(a, b, 4.0, [0, 0, 2, 3, 4, 5, 6, 7]), rel=1e-6)


def test_sigmoid_loss_matches_loops():
    g = torch.Generator().manual_seed(11)
    a, b = unit_rows(6, 5, g), unit_rows(6, 5, g)
    for ids in ([0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 2, 5]):
        got = sigmoid_loss(a, b, torch.tensor([10.0]), torch.tensor([-10.0]), ids=torch.tensor(ids))
        assert got.item() == pytest.approx(naive_sigmoid(a, b, 10.0, -10.0, ids), rel=1e-6)
    assert sigmoid_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0)).item() == pytest.approx(
        naive_sigmoid(a, b, 10.0, -10.0, list(range(6))), rel=1e-6)


def test_nt_xent_matches_loops():
    g = torch.Generator().manual_seed(1)
    z1, z2 = unit_rows(6, 4, g), unit_rows(6, 4, g)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(naive_nt_xent(z1, z2, 0.3), rel=1e-6)
    ids = [0, 1, 0, 2, 1, 0]
    masked = nt_xent(z1, z2, 0.3, ids=torch.tensor(ids)).item()
    assert masked == pytest.approx(naive_nt_xent(z1, z2, 0.3, ids), rel=1e-6)
    assert masked != pytest.approx(naive_nt_xent(z1, z2, 0.3), rel=1e-3)


def naive_center(z1: torch.Tensor, z2: torch.Tensor) -> tuple[list, list]:
    """Both views minus the mean of all 2n embeddings, each renormalised, with Python loops."""
    rows = [list(map(float, r)) for r in list(z1) + list(z2)]
    mean = [sum(r[d] for r in rows) / len(rows) for d in range(len(rows[0]))]
    out = []
    for r in rows:
        c = [x - m for x, m in zip(r, mean)]
        norm = math.sqrt(sum(x * x for x in c))
        out.append(torch.tensor([x / norm for x in c], dtype=torch.float64))
    return out[:len(z1)], out[len(z1):]


def test_centered_nt_xent_matches_loops_and_lifts_a_collapsed_start():
    g = torch.Generator().manual_seed(11)
    z1, z2 = unit_rows(6, 5, g), unit_rows(6, 5, g)
    ids = [0, 1, 0, 2, 1, 3]
    for i in (None, ids):
        got = nt_xent(z1, z2, 0.2, None if i is None else torch.tensor(i), center=True).item()
        assert got == pytest.approx(naive_nt_xent(*naive_center(z1, z2), 0.2, i), rel=1e-6)
    # every embedding a common direction plus a small sample-specific part (a random-init BERT's [CLS]):
    # plain NT-Xent sits at its ceiling ln(2n - 1); centred, the pairs are told apart from the start
    n, common = 16, F.normalize(torch.randn(1, 32, generator=g, dtype=torch.float64), dim=-1)
    own = 0.01 * torch.randn(n, 32, generator=g, dtype=torch.float64)
    a = F.normalize(common + own + 0.002 * torch.randn(n, 32, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(common + own + 0.002 * torch.randn(n, 32, generator=g, dtype=torch.float64), dim=-1)
    assert nt_xent(a, b, 0.1).item() == pytest.approx(math.log(2 * n - 1), abs=0.05)
    assert nt_xent(a, b, 0.1, center=True).item() < 0.5 * math.log(2 * n - 1)


def naive_uniformity(z: torch.Tensor, ids: list | None = None, t: float = 2.0) -> float:
    n = len(z)
    ids = list(range(n)) if ids is None else ids
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j and ids[i] != ids[j]]
    sq = lambda i, j: sum((float(x) - float(y)) ** 2 for x, y in zip(z[i], z[j]))  # noqa: E731
    return math.log(sum(math.exp(-t * sq(i, j)) for i, j in pairs) / len(pairs))


def test_uniformity_matches_loops_with_exact_gradient():
    """Wang & Isola's uniformity over distinct-identity pairs; its gradient (written with the rank-scaling
    used for gathered batches) equals plain autograd of the same quantity."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ids = [0, 1, 0, 2, 3]
    for i in (None, ids):
        z = F.normalize(x @ w, dim=-1)
        got = uniformity_loss(z, None if i is None else torch.tensor(i))
        assert got.item() == pytest.approx(naive_uniformity(z.detach(), i), rel=1e-9)
        (grad,) = torch.autograd.grad(got, w)
        z, own = F.normalize(x @ w, dim=-1), torch.tensor(i or range(5))
        keep = own[:, None] != own[None, :]
        plain = torch.log(torch.exp(-2 * ((z[:, None] - z[None, :]) ** 2).sum(-1))[keep].mean())
        (want,) = torch.autograd.grad(plain, w)
        assert torch.allclose(grad, want, rtol=1e-9, atol=1e-12)
    same = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    assert uniformity_loss(same, torch.tensor([7, 7, 7])).item() == 0.0  # one identity: no pair, no push


def test_hard_negative_sampling_follows_softmax_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, generator=g)  # rows 0..3 have their positive at column row + 1
    excluded = torch.zeros(4, 5, dtype=torch.bool)
    excluded[torch.arange(4), torch.arange(4) + 1] = True
    excluded[2, 0] = True  # row 2 shares its identity with column 0
    sample = lambda **kw: sample_hard_negatives(logits, excluded, 1, **kw)[0]  # noqa: E731
    draws = torch.stack([sample(seed=3, step=s, stream=0) for s in range(3000)])
    for i in range(4):
        assert not excluded[i, draws[:, i]].any()
        others = [j for j in range(5) if not excluded[i, j]]
        z = sum(math.exp(float(logits[i, j])) for j in others)
        for j in others:
            expected = math.exp(float(logits[i, j])) / z
            observed = float((draws[:, i] == j).float().mean())
            assert abs(observed - expected) < 0.035, (i, j, observed, expected)
    assert torch.equal(sample(seed=3, step=17, stream=0), draws[17])
    streams = torch.stack([sample(seed=3, step=s, stream=1) for s in range(50)])
    seeds = torch.stack([sample(seed=4, step=s, stream=0) for s in range(50)])
    assert not torch.equal(streams, draws[:50]) and not torch.equal(seeds, draws[:50])
    everything = torch.ones(4, 5, dtype=torch.bool)
    everything[0, 3] = False
    _, valid = sample_hard_negatives(logits, everything, 1, seed=3, step=0, stream=0)
    assert valid.tolist() == [True, False, False, False]


def fake_outputs(n: int, g: torch.Generator) -> dict:
    keys = ["image_emb", "text_emb", "image_emb_feat", "text_emb_feat", "image_feature_1", "image_feature_2",
            "text_feature_1", "text_feature_2", "image_ssl_1", "image_ssl_2", "text_ssl_1", "text_ssl_2"]
    out = {k: unit_rows(n, 8, g).float() for k in keys}
    out["logit_scale"] = torch.tensor(3.0)
    return out


def test_objective_terms_and_weighted_total():
    g = torch.Generator().manual_seed(3)
    cfg = tiny_config(mlm=0.0, itm=0.0, itc=2.0, text_ssl=0.5)
    cfg.loss.image_ssl.temperature = 0.2
    cfg.loss.text_feature.temperature = 0.05
    out = fake_outputs(5, g)
    ids = [4, 1, 4, 2, 9]
    loss, logs = UniMlipObjective(cfg)({"report_id": torch.tensor(ids)}, out, None, step=0)
    uni = ("image_ssl", "image_feature", "text_ssl", "text_feature")
    t = {name: getattr(cfg.loss, name).temperature for name in uni}
    want = {
        "itc": naive_multi_positive(out["image_emb"], out["text_emb"], 3.0, ids),
        "itc_feature": naive_multi_positive(out["image_emb_feat"], out["text_emb_feat"], 3.0, ids),
        "image_ssl": naive_nt_xent(out["image_ssl_1"], out["image_ssl_2"], t["image_ssl"], ids),
        "image_feature": naive_nt_xent(out["image_feature_1"], out["image_feature_2"], t["image_feature"], ids),
        # the text terms centre their embeddings by default (loss.<term>.center)
        "text_ssl": naive_nt_xent(*naive_center(out["text_ssl_1"], out["text_ssl_2"]), t["text_ssl"], ids),
        "text_feature": naive_nt_xent(*naive_center(out["text_feature_1"], out["text_feature_2"]), t["text_feature"],
                                      ids),
    }
    assert cfg.loss.text_ssl.center and cfg.loss.text_feature.center and not cfg.loss.image_ssl.center
    assert set(logs) == set(want) | {"loss"}
    for name, value in want.items():
        assert logs[name].item() == pytest.approx(value, rel=1e-5), name
    total = sum(getattr(cfg.loss, name).weight * value for name, value in want.items())
    assert logs["loss"].item() == pytest.approx(total, rel=1e-5) and loss.item() == pytest.approx(total, rel=1e-5)
    cfg.loss.positives = "none"  # identities ignored: the plain losses
    _, plain = UniMlipObjective(cfg)({"report_id": torch.tensor(ids)}, out, None, step=0)
    assert plain["itc"].item() == pytest.approx(naive_infonce(out["image_emb"], out["text_emb"], 3.0), rel=1e-5)
    assert plain["text_ssl"].item() == pytest.approx(
        naive_nt_xent(*naive_center(out["text_ssl_1"], out["text_ssl_2"]), t["text_ssl"]), rel=1e-5)


@pytest.mark.parametrize("mode,label_terms", [("labels", ("text_ssl", "text_feature")), ("labels_ssl", ("text_ssl",))])
def test_label_positives_spare_same_label_reports_in_the_text_pair_only(mode, label_terms):
    """``loss.text_positives=labels``: text_ssl and text_feature keep reports of the same label set (any order)
    out of their negatives, besides equal reports; ``labels_ssl``: text_ssl only. An unlabelled report is alike
    only to itself; ITC and the image terms keep plain report identity; ``label_alike`` counts the pairs added."""
    g = torch.Generator().manual_seed(4)
    cfg = tiny_config(mlm=0.0, itm=0.0)
    cfg.loss.text_positives = mode
    out = fake_outputs(9, g)
    reports = [0, 1, 0, 2, 3, 4, 5, 6, 7]
    labels = [["pneumonia"], ["normal"], ["pneumonia"], ["effusion", "pneumonia"], ["pneumonia", "effusion"],
              ["pneumonia"], ["normal"], [], []]
    samples = [{"key": f"s{i}", "meta": {"labels": lab}} for i, lab in enumerate(labels)]
    batch = {"report_id": torch.tensor(reports), "label_id": torch.tensor([label_id(s) for s in samples])}
    _, logs = UniMlipObjective(cfg)(batch, out, None, step=0)
    label_sets = [tuple(sorted(lab)) or f"alone{i}" for i, lab in enumerate(labels)]
    both = list(zip(reports, label_sets))
    t = cfg.loss.text_ssl.temperature
    for name in ("text_ssl", "text_feature"):
        centred = naive_center(out[f"{name}_1"], out[f"{name}_2"])
        with_labels = naive_nt_xent(*centred, t, both)
        without = naive_nt_xent(*centred, t, reports)
        assert logs[name].item() == pytest.approx(with_labels if name in label_terms else without, rel=1e-5), name
        assert with_labels != pytest.approx(without, rel=1e-3), name
    assert logs["itc"].item() == pytest.approx(naive_multi_positive(out["image_emb"], out["text_emb"], 3.0, reports),
                                               rel=1e-5)
    assert logs["image_ssl"].item() == pytest.approx(
        naive_nt_xent(out["image_ssl_1"], out["image_ssl_2"], cfg.loss.image_ssl.temperature, reports), rel=1e-5)
    added = [sum(label_sets[i] == label_sets[j] and reports[i] != reports[j] for j in range(9)) for i in range(9)]
    assert logs["label_alike"].item() == pytest.approx(sum(added) / 9) and sum(added) == 8
    with pytest.raises(KeyError, match="label_id"):
        UniMlipObjective(cfg)({"report_id": torch.tensor(reports)}, out, None, step=0)


@pytest.fixture(scope="module", params=[1, 2], ids=["final_tokens", "two_stages"])
def fused(tmp_path_factory, request):
    """The tiny model; ``two_stages``: the fusion encoder also reads the tokens of the block before the last
    (model.fusion.image_stages=2), so image tokens are a tuple of two groups."""
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0)
    cfg.model.fusion.image_stages = request.param
    model = build_model(cfg, tiny_tokenizer(tmp_path_factory.mktemp("vocab"))).eval()
    batch = random_batch(6, 9, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(batch)
    assert isinstance(out["image_tokens"], tuple) == (request.param == 2)
    return cfg, model, batch, out


def rows_of(tokens, i: int, j: int):
    """Rows i..j of image tokens, a tensor or a tuple of token groups."""
    return tuple(t[i:j] for t in tokens) if isinstance(tokens, tuple) else tokens[i:j]


def test_mlm_matches_loops(fused):
    cfg, model, batch, out = fused
    got = UniMlipObjective(tiny_config(**{n: 0.0 for n in ("itc", "itc_feature", "image_ssl", "image_feature",
                                                          "text_ssl", "text_feature", "itm")}))
    with torch.no_grad():
        value = got(batch, out, model, step=0)[1]["mlm"].item()
        # the masked report's states, mask and targets as the model gives them (by default the augmented
        # report's: tests/test_model.py checks those against the loader's masking)
        states = model.fuse(out["mlm_tokens"], out["mlm_mask"], out["image_tokens"])
        losses = []
        for i in range(states.shape[0]):
            for j in range(states.shape[1]):
                label = int(out["mlm_labels"][i, j])
                if label != -100:
                    logits = model.mlm_head(states[i, j]).double()
                    losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
    assert len(losses) > 3
    assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("negatives, fraction", [("image_and_text", 1.0), ("one_per_pair", 1.0),
                                                ("one_per_pair", 0.5), ("image_and_text", 0.34)])
@pytest.mark.parametrize("report_ids", [[0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 2, 2], [0, 0, 0, 0, 0, 1]])
def test_itm_hard_negatives_matches_loops(fused, report_ids, negatives, fraction):
    """The hardest allowed negative (a loop finds it at a huge scale); never a same-report sample; a row whose
    every other sample shares its report has no negative and is dropped (and counted). ``one_per_pair``: row i
    keeps only its negative text when i + step is even, only its negative image otherwise. ``itm_acc``: the
    share of scored rows whose argmax is their label. ``itm_fraction`` < 1: only the round(f * n) pairs with
    the largest hashed keys of (seed, step, row) are scored."""
    cfg, model, batch, out = fused
    n = out["image_emb"].shape[0]
    out = {**out, "logit_scale": torch.tensor(1e6)}
    batch = {**batch, "report_id": torch.tensor(report_ids)}
    itm_cfg = tiny_config(**{n: 0.0 for n in ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl",
                                              "text_feature", "mlm")})
    itm_cfg.loss.itm_negatives, itm_cfg.loss.itm_fraction = negatives, fraction
    objective = UniMlipObjective(itm_cfg)
    step = 5
    keys = gumbel_noise(itm_cfg.seed, step, 2, torch.arange(n), 1)[:, 0].tolist()
    scored = sorted(range(n), key=lambda i: -keys[i])[:round(fraction * n)]

    def hardest(x: torch.Tensor, y: torch.Tensor, i: int):
        sims = [(dot(x[i], y[j]), j) for j in range(n) if report_ids[j] != report_ids[i]]
        return max(sims)[1] if sims else None

    with torch.no_grad():
        _, logs = objective(batch, out, model, step=step)
        mask, text, image = batch["attention_mask"], out["text_tokens"], out["image_tokens"]
        losses, dropped, correct = [], 0, 0
        for i in sorted(scored):
            jt = hardest(out["image_emb"], out["text_emb"], i)
            ji = hardest(out["text_emb"], out["image_emb"], i)
            rows = [(i, i, 1), (jt, i, 0), (i, ji, 0)]
            if negatives == "one_per_pair":
                rows = [rows[0], rows[1] if (i + step) % 2 == 0 else rows[2]]
            for t, im, label in rows:
                if t is None or im is None:
                    dropped += 1
                    continue
                fused_cls = model.fuse(text[t:t + 1], mask[t:t + 1], rows_of(image, im, im + 1))[0, 0]
                logits = model.itm_head(fused_cls).double()
                losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
                correct += int(int(logits.argmax()) == label)
    assert logs["itm"].item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert logs["itm_dropped_rows"].item() == dropped
    assert logs["itm_acc"].item() == pytest.approx(correct / len(losses), abs=1e-6)


@pytest.mark.parametrize("term,key", [("image_ssl", "image_view2"), ("text_ssl", "text_view2_ids"),
                                      ("mlm", "mlm_labels")])
def test_missing_input_names_term_and_key(fused, term, key):
    _, model, batch, _ = fused
    incomplete = {k: v for k, v in batch.items() if k != key}
    with pytest.raises(KeyError, match=f"'{term}'.*'{key}'"):
        model(incomplete)


def test_auxiliary_weights_ramp_linearly_and_uniformity_is_a_term():
    """``loss.aux_warmup_steps`` = 4 with 2 accumulated micro batches: every weight but ITC's is scaled by
    optimizer step / 4 (the micro batches of one step share the scale); the optional uniformity term is the
    mean of the image and report uniformity."""
    g = torch.Generator().manual_seed(13)
    cfg = tiny_config(mlm=0.0, itm=0.0, uniformity=0.5)
    cfg.loss.aux_warmup_steps, cfg.train.grad_accum = 4, 2
    out = fake_outputs(6, g)
    batch = {"report_id": torch.arange(6)}
    objective = UniMlipObjective(cfg)
    _, full = UniMlipObjective(tiny_config(mlm=0.0, itm=0.0, uniformity=0.5))(batch, out, None, step=0)
    assert "aux_scale" not in full
    assert full["uniformity"].item() == pytest.approx(
        (naive_uniformity(out["image_emb"]) + naive_uniformity(out["text_emb"])) / 2, rel=1e-5)
    aux = sum(getattr(cfg.loss, name).weight * full[name].item() for name in cfg.loss.enabled() if name != "itc")
    assert aux > 0
    for micro_step, scale in ((0, 0.0), (1, 0.0), (2, 0.25), (5, 0.5), (7, 0.75), (8, 1.0), (40, 1.0)):
        loss, logs = objective(batch, out, None, step=micro_step)
        assert logs["aux_scale"].item() == scale, micro_step
        want = cfg.loss.itc.weight * full["itc"].item() + scale * aux
        assert loss.item() == pytest.approx(want, rel=1e-5) and logs["loss"].item() == pytest.approx(want, rel=1e-5)
