"""Evaluation metrics against hand-computed examples and naive reference implementations."""
import math

import numpy as np
import pytest
import torch
from transformers import BertTokenizer

import unimlip_train.eval.linear_probe as linear_probe
import unimlip_train.eval.metrics as metrics
import unimlip_train.eval.zeroshot as zeroshot

# ---------------------------------------------------------------------------------------------- retrieval

# Rows are images, columns texts; texts 1 and 2 are the same report (up to whitespace).
HAND_SIMS = [
    [0.5, 0.9, 0.1, 0.5],  # correct {0}: 0.9 beats it, 0.5 ties it (pessimistic) -> rank 3
    [0.2, 0.3, 0.8, 0.1],  # correct {1, 2}: best correct 0.8 -> rank 1 (rank 2 without the duplicate rule)
    [0.9, 0.4, 0.2, 0.1],  # correct {1, 2}: best correct 0.4, 0.9 beats it -> rank 2
    [0.3, 0.3, 0.3, 0.3],  # correct {3}: all tied -> rank 4 (worst)
]
HAND_TEXTS = ["clear lungs.", "small left effusion.", "small  left effusion. ", "cardiomegaly."]


def _hand_metrics(texts):
    image = torch.tensor(HAND_SIMS, dtype=torch.float64)
    return metrics.retrieval_metrics(image, torch.eye(4, dtype=torch.float64), texts, ks=(1, 2, 3))


def test_retrieval_hand_example_with_ties_and_duplicates():
    m = _hand_metrics(HAND_TEXTS)
    # i2t ranks [3, 1, 2, 4]; t2i ranks (columns as queries) [2, 2, 1, 2]
    assert (m["i2t_R@1"], m["i2t_R@2"], m["i2t_R@3"]) == (25.0, 50.0, 75.0)
    assert (m["t2i_R@1"], m["t2i_R@2"], m["t2i_R@3"]) == (25.0, 100.0, 100.0)
    assert m["mean_recall"] == pytest.approx((25 + 50 + 75 + 25 + 100 + 100) / 6)
    assert m["median_rank_i2t"] == 2.5 and m["median_rank_t2i"] == 2.0
    assert m["chance_R@1"] == pytest.approx(100 * (1 + 2 + 2 + 1) / 4 / 4)
    assert m["num_samples"] == 4


def test_retrieval_without_duplicate_rule_only_diagonal_counts():
    m = _hand_metrics(None)
    # i2t ranks [3, 2, 3, 4]: image 1's own text (0.3) is beaten by the copy at 0.8, image 2's (0.2) by two
    assert (m["i2t_R@1"], m["i2t_R@2"], m["i2t_R@3"]) == (0.0, 25.0, 75.0)
    assert m["chance_R@1"] == 25.0


def test_retrieval_default_ks_and_constant_model_is_worst():
    n = 12
    m = metrics.retrieval_metrics(torch.ones(n, 8) / math.sqrt(8), torch.ones(n, 8) / math.sqrt(8),
                                  [f"report {i}" for i in range(n)])
    assert m["i2t_R@1"] == m["t2i_R@10"] == 0.0
    assert m["median_rank_i2t"] == n
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"} <= set(m)


def test_retrieval_matches_naive_loop_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    n = 30
    img = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, 6, generator=g), dim=1)
    texts = [f"t{i % 22}" for i in range(n)]  # 8 duplicated reports
    txt[22:] = txt[:8]  # identical text -> identical embedding, as a real encoder gives
    m = metrics.retrieval_metrics(img, txt, texts)
    sims = (img.double() @ txt.double().T).tolist()

    def naive_rank(row, correct):
        best = max(row[j] for j in correct)
        return 1 + sum(1 for j, s in enumerate(row) if j not in correct and s >= best)

    i2t = [naive_rank(sims[i], {j for j in range(n) if texts[j] == texts[i]}) for i in range(n)]
    t2i = [naive_rank([sims[i][j] for i in range(n)], {i for i in range(n) if texts[i] == texts[j]})
           for j in range(n)]
    for k in (1, 5, 10):
        assert m[f"i2t_R@{k}"] == pytest.approx(100 * sum(r <= k for r in i2t) / n)
        assert m[f"t2i_R@{k}"] == pytest.approx(100 * sum(r <= k for r in t2i) / n)
    assert m["median_rank_i2t"] == float(np.median(i2t))


# ---------------------------------------------------------------------------------------------- AUROC

def naive_auroc(scores, targets):
    pos = [s for s, t in zip(scores, targets) if t]
    neg = [s for s, t in zip(scores, targets) if not t]
    if not pos or not neg:
        return math.nan
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = rng.random(60) < 0.4
    scores = np.round(rng.normal(size=60) + targets, 1)  # rounding makes plenty of ties
    assert metrics.auroc(scores, targets) == pytest.approx(naive_auroc(scores, targets), abs=1e-12)


def test_auroc_edge_cases():
    assert metrics.auroc([0.3] * 6, [1, 0, 1, 0, 0, 1]) == 0.5
    assert metrics.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(metrics.auroc([1, 2, 3], [1, 1, 1]))


# ---------------------------------------------------------------------------------------------- classification

def test_single_label_metrics_against_naive():
    rng = np.random.default_rng(1)
    n, c = 50, 3
    y = rng.integers(0, c, n)
    y[:3] = 0  # every class present
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    scores = metrics.one_vs_rest_log_odds(torch.from_numpy(logits)).numpy()
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    m = metrics.single_label_metrics(scores, y, ["a", "b", "c"])
    pred = [max(range(c), key=lambda j: scores[i][j]) for i in range(n)]
    assert m["accuracy"] == pytest.approx(100 * sum(p == t for p, t in zip(pred, y)) / n)
    recalls = [sum(1 for i in range(n) if y[i] == k and pred[i] == k) / sum(1 for i in range(n) if y[i] == k)
               for k in range(c)]
    assert m["balanced_accuracy"] == pytest.approx(100 * sum(recalls) / c)
    # log-odds rank samples exactly like the softmax probability of the class
    per_class = [naive_auroc([probs[i][k] for i in range(n)], [y[i] == k for i in range(n)]) for k in range(c)]
    for name, ref in zip("abc", per_class):
        assert m[f"auroc/{name}"] == pytest.approx(100 * ref)
    assert m["auroc"] == pytest.approx(100 * sum(per_class) / c)


def test_multi_label_metrics_against_naive():
    rng = np.random.default_rng(2)
    n, c = 40, 3
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[:, 2] = 0  # a class without positives: AUROC undefined, left out of the macro mean
    scores = rng.normal(size=(n, c)) + y
    m = metrics.multi_label_metrics(scores, y, ["x", "y", "z"])
    pred = scores > 0
    assert m["accuracy"] == pytest.approx(100 * (pred == y.astype(bool)).mean())
    bal = []
    for k in range(c):
        parts = [np.mean([pred[i, k] == y[i, k] for i in range(n) if y[i, k] == v]) for v in (0, 1)
                 if (y[:, k] == v).any()]
        bal.append(np.mean(parts))
    assert m["balanced_accuracy"] == pytest.approx(100 * np.mean(bal))
    ref = [naive_auroc(scores[:, k], y[:, k]) for k in range(2)]
    assert math.isnan(m["auroc/z"])
    assert m["auroc"] == pytest.approx(100 * np.mean(ref))


# ---------------------------------------------------------------------------------------------- zero-shot

WORDS = ["no", "there", "is", "pneumonia", "consolidation", "normal", "clear", "lungs", "effusion", "the",
         "acute", "cardiopulmonary", "abnormality", "of", "evidence", "finding", "."]


class BagOfWordsEncoder(torch.nn.Module):
    """A tiny real text encoder (mean of word embeddings) for testing the prompt-ensembling arithmetic."""

    def __init__(self, vocab_size: int, dim: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, dim)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(3))

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((self.emb(input_ids) * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture()
def tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizer(vocab=vocab)


def test_prompt_file_and_class_prompts(tmp_path):
    p = zeroshot.load_prompts()
    pneumonia = p.positive("Pneumonia")
    assert "pneumonia." in pneumonia and "findings consistent with consolidation." in pneumonia
    assert "no acute cardiopulmonary abnormality." in p.positive("normal")
    assert not any("normal." == s for s in p.positive("normal"))  # explicit prompts only
    assert "no pneumonia." in p.negative("pneumonia")
    assert p.positive("hiatal_hernia") == [t.format("hiatal hernia") for t in p.templates]
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates: ['a chest x-ray']\n")
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot.load_prompts(bad)
    bad.write_text("classes: {a: {nmes: [x]}}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        zeroshot.load_prompts(bad)


def test_zeroshot_matches_naive_reference(tokenizer, tmp_path):
    prompt_file = tmp_path / "p.yaml"
    prompt_file.write_text("templates: ['{}.', 'there is {}.']\nnegative_templates: ['no {}.']\n"
                           "classes:\n  normal: {prompts: ['the lungs are clear.', 'no acute abnormality.'],"
                           " negative_prompts: ['acute abnormality.']}\n  pneumonia: {names: [pneumonia, consolidation]}\n")
    prompts = zeroshot.load_prompts(prompt_file)
    enc = BagOfWordsEncoder(len(tokenizer.vocab))
    g = torch.Generator().manual_seed(4)
    n = 24
    images = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    labels = [["Pneumonia"] if i % 3 else ["normal"] for i in range(n)]
    labels[5] = []  # unlabelled: skipped in single-label mode
    labels[7] = ["normal", "pneumonia"]  # ambiguous: skipped
    classes = ["normal", "pneumonia"]

    def naive_class_embedding(sentences):
        vecs = []
        for s in sentences:  # one prompt at a time, unpadded
            tok = tokenizer([s], return_tensors="pt")
            v = enc(tok["input_ids"], tok["attention_mask"])[0]
            vecs.append(v / v.norm())
        mean = torch.stack(vecs).mean(0)
        return mean / mean.norm()

    with torch.no_grad():
        pos = [naive_class_embedding(prompts.positive(c)) for c in classes]
        neg = [naive_class_embedding(prompts.negative(c)) for c in classes]
        # Unlabelled images leaning towards 'normal': its offset grows, so some decisions flip to pneumonia.
        calibration = torch.nn.functional.normalize(torch.randn(10, 8, generator=g) + 2 * pos[0], dim=1)
        m = zeroshot.zeroshot_evaluate(images, labels, enc, tokenizer, classes, prompts, max_length=16,
                                       calibration_emb=calibration)
        mm = zeroshot.zeroshot_evaluate(images, labels, enc, tokenizer, classes, prompts, max_length=16,
                                        multi_label=True)
        with pytest.raises(ValueError, match="single-label only"):
            zeroshot.zeroshot_evaluate(images, labels, enc, tokenizer, classes, prompts, max_length=16,
                                       multi_label=True, calibration_emb=calibration)

    keep = [i for i in range(n) if i not in (5, 7)]
    y = [1 if labels[i] == ["Pneumonia"] else 0 for i in keep]
    sims = [[float(images[i] @ pos[k]) for k in range(2)] for i in keep]
    pred = [0 if s[0] >= s[1] else 1 for s in sims]
    assert m["skipped"] == 2 and m["num_samples"] == len(keep)
    assert m["accuracy"] == pytest.approx(100 * sum(p == t for p, t in zip(pred, y)) / len(y))
    # binary: the log-odds of "pneumonia" rank samples like sim(pneumonia) - sim(normal)
    ref_auc = naive_auroc([s[1] - s[0] for s in sims], y)
    assert m["auroc/pneumonia"] == pytest.approx(100 * ref_auc, abs=1e-9)
    assert m["auroc"] == pytest.approx(100 * ref_auc, abs=1e-9)
    # calibrated: each class's similarity minus its mean over the calibration images, then the argmax
    offsets = [float(np.mean([float(c @ pos[k]) for c in calibration])) for k in range(2)]
    cal_pred = [0 if s[0] - offsets[0] >= s[1] - offsets[1] else 1 for s in sims]
    recalls = [np.mean([p == t for p, t in zip(cal_pred, y) if t == c]) for c in (0, 1)]
    assert m["calibrated_accuracy"] == pytest.approx(100 * np.mean([p == t for p, t in zip(cal_pred, y)]))
    assert m["calibrated_balanced_accuracy"] == pytest.approx(100 * np.mean(recalls))
    assert cal_pred != pred  # the offsets moved some decision, so the check above has teeth

    # multi-label: class k positive iff sim(positive_k) > sim(negative_k); every sample kept
    y_ml = [[int("normal" in [x.lower() for x in lab]), int("pneumonia" in [x.lower() for x in lab])]
            for lab in labels]
    diffs = [[float(images[i] @ pos[k] - images[i] @ neg[k]) for k in range(2)] for i in range(n)]
    acc = np.mean([(diffs[i][k] > 0) == bool(y_ml[i][k]) for i in range(n) for k in range(2)])
    assert mm["accuracy"] == pytest.approx(100 * acc) and mm["skipped"] == 0
    ref = [naive_auroc([d[k] for d in diffs], [t[k] for t in y_ml]) for k in range(2)]
    assert mm["auroc"] == pytest.approx(100 * np.mean(ref), abs=1e-9)


def test_calibration_undoes_a_prompt_bias_without_labels():
    """Both classes' images lie nearer class 0's prompt (a biased prompt pair): the argmax calls every image
    class 0, although the similarity difference separates the classes perfectly. Centring each class's logit on
    its mean over unlabelled images of both kinds recovers the classes."""
    def at(degrees):
        rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
        return torch.stack([rad.cos(), rad.sin()], dim=-1)

    classes = at([0.0, 36.87])  # class 1's prompt sits 36.87 degrees away
    images = at([3.0, 5.0, 7.0, 14.0, 16.0, 18.0])  # the first three are class 0; all nearer class 0's prompt
    targets = np.array([0, 0, 0, 1, 1, 1])
    unlabelled = at([4.0, 6.0, 15.0, 17.0])
    raw = metrics.single_label_metrics(zeroshot.zeroshot_scores(images, classes), targets, ["a", "b"])
    calibrated = metrics.single_label_metrics(zeroshot.zeroshot_scores(images, classes, calibration_emb=unlabelled),
                                              targets, ["a", "b"])
    assert raw["balanced_accuracy"] == 50.0 and raw["auroc"] == 100.0
    assert calibrated["balanced_accuracy"] == 100.0 and calibrated["auroc"] == 100.0


def test_eval_cli_rejects_calibrated_multi_label():
    from unimlip_train.cli.eval import main

    with pytest.raises(SystemExit) as e:
        main(["zeroshot", "--checkpoint", "x", "--data", "y", "--classes", "a,b", "--multi-label",
              "--calibration-data", "z"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- linear probe

def test_carve_validation_is_stratified_and_deterministic():
    y = np.array([0] * 10 + [1] * 5 + [0] * 5)
    fit, val = linear_probe.carve_validation(y, 0.2)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(20))
    assert (y[val] == 0).sum() == 3 and (y[val] == 1).sum() == 1
    assert np.array_equal(val, linear_probe.carve_validation(y, 0.2)[1])


def test_fit_logistic_reaches_stationary_point():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(80, generator=g, dtype=torch.float64) > 0).long()
    w, b = linear_probe.fit_logistic(x, y, 2, l2=0.1)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.05 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6


def test_linear_probe_separates_clusters_better_than_chance():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(3, 16, generator=g, dtype=torch.float64) * 1.5

    def draw(n):
        y = torch.arange(n) % 3
        return centres[y] + torch.randn(n, 16, generator=g, dtype=torch.float64), y.numpy()

    (tx, ty), (sx, sy) = draw(150), draw(60)
    m = linear_probe.linear_probe(tx, ty, sx, sy, ["a", "b", "c"])
    assert m["accuracy"] > 80 and m["balanced_accuracy"] > 80
    assert m["l2"] in linear_probe.L2_GRID and m["num_train"] == 150 and m["num_test"] == 60
    m2 = linear_probe.linear_probe(tx, ty, sx, sy, ["a", "b", "c"])
    assert m == m2  # deterministic
