"""Transfer end to end on real shards with real launches: a brief pre-training that starts the image tower from a
locally saved timm state dict and keeps it locked but for its last block (the locked part stays bit-identical to
the file, and the optimizer holds no state for it), then ``unimlip-finetune classify`` and ``unimlip-finetune vqa``
from that checkpoint, their metrics checked against naive recomputations and chance / the question-only baseline.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
PRETRAIN_STEPS = 30

pytestmark = pytest.mark.multiprocess


def _run(*cmd: str, timeout: int = 900) -> str:
    out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    shard = ["data_prep.cli", "--workers", "1", "--no-progress", "--image-size", "64", "--max-size", "64"]
    _run(*shard[:1], "synthetic", *shard[1:], "--n", "400", "--val-fraction", "0.25", "--out", str(root / "pre"))
    _run(*shard[:1], "synthetic-vqa", *shard[1:], "--n", "400", "--seed", "1", "--out", str(root / "vqa"))
    torch.manual_seed(1)
    net = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    for module in net.modules():  # non-default statistics, so a tower that updated them would show it
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    save_file(net.state_dict(), str(root / "resnet10t.safetensors"))
    _run("unimlip_train.cli.train", "--config", str(CONFIG), "--run-dir", str(root / "run"),
         f"data.train={root / 'pre' / 'index.json'}", f"data.val={root / 'pre' / 'index.json'}", "data.num_workers=1",
         f"model.image.pretrained={root / 'resnet10t.safetensors'}", "model.image.lock=true",
         "model.image.lock_unlocked_groups=1", f"train.steps={PRETRAIN_STEPS}", "train.warmup_steps=5",
         "train.checkpoint_every=0", "train.log_every=10")
    return root


def test_a_locked_tower_stays_bit_identical_to_its_file_and_has_no_optimizer_state(work):
    import yaml

    from unimlip_train.config.load import config_from_dict
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.engine.checkpoint import consolidated_state_dict, resolve_checkpoint
    from unimlip_train.models.build import build_model

    tag = resolve_checkpoint(str(work / "run"))
    assert tag.endswith(f"step_{PRETRAIN_STEPS:07d}")
    trained = consolidated_state_dict(tag)
    source = load_file(str(work / "resnet10t.safetensors"))
    locked = [k for k in source if not k.startswith("layer4.")]  # timm's last group (layer4) was left trainable
    assert len(locked) > 30
    for k in locked:  # weights and BatchNorm statistics (eval mode), exactly
        assert torch.equal(trained[f"image_tower.model.{k}"], source[k]), k
    assert not torch.equal(trained["image_tower.model.layer4.0.conv1.weight"], source["layer4.0.conv1.weight"])
    assert not torch.equal(trained["image_tower.model.layer4.0.bn1.running_mean"], source["layer4.0.bn1.running_mean"])

    cfg = config_from_dict(yaml.safe_load((Path(tag) / "config.yaml").read_text()))
    tag_cfg = timm.models.get_pretrained_cfg("resnet10t")
    assert cfg.data.mean == pytest.approx([np.mean(tag_cfg.mean)])
    assert cfg.data.image_size == 64  # the config file sets the size
    model = build_model(cfg, load_tokenizer())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    (optim_file,) = Path(tag).glob("*optim_states.pt")
    state = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]  # our own file
    held = sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    assert frozen > 1_000_000 and held == trainable


def _naive_auroc(scores, positive) -> float:
    pos, neg = [s for s, p in zip(scores, positive) if p], [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_finetune_classify_on_a_label_fraction_sampled_by_patient(work, tmp_path):
    out = tmp_path / "cls"
    stdout = _run("unimlip_train.cli.finetune", "classify", "--checkpoint", str(work / "run"), "--data",
                  str(work / "pre"), "--label-key", "labels", "--classes", "No Finding,Opacity", "--fraction", "0.5",
                  "--epochs", "10", "--lr", "5e-4", "--batch-size", "16", "--val-split", "", "--test-split", "val",
                  "--workers", "0", "--out", str(out))
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert {"accuracy", "balanced_accuracy", "auroc", "auroc/No Finding", "auroc/Opacity", "card"} <= set(doc)
    assert doc == json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "card.json").read_text()) == doc["card"]
    card = doc["card"]
    assert card["tool"] == "unimlip-finetune classify" and card["step"] == PRETRAIN_STEPS
    assert card["data"]["splits"] == {"train": "train", "val": "20% of train's groups", "test": "val"}
    assert card["settings"]["fraction"] == 0.5 and card["seed"] == 0

    # which samples trained: whole patients, about half of those left after the validation carve, per class
    from unimlip_train.finetune.data import split_samples

    meta = dict(split_samples(str(work / "pre"), "train"))
    single = {k for k, m in meta.items() if len({"No Finding", "Opacity"} & set(m["labels"])) == 1}
    used = json.loads((out / "samples.json").read_text())
    groups = {part: {meta[k]["group"] for k in keys} for part, keys in used.items()}
    assert not groups["train"] & groups["val"]
    assert {k for k in single if meta[k]["group"] in groups["train"]} == set(used["train"])  # whole groups
    fit_groups = {meta[k]["group"] for k in single} - groups["val"]
    assert 0.4 < len(groups["train"]) / len(fit_groups) < 0.6
    assert card["samples"] == {"train": len(used["train"]), "val": len(used["val"]), "test": int(doc["num_samples"])}

    # the reported test metrics, recomputed naively from the saved model's logits
    from unimlip_train.export import load_for_eval
    from unimlip_train.finetune.classify import Classifier
    from unimlip_train.finetune.data import items

    model, cfg, tokenizer = load_for_eval(str(work / "run"))
    cfg.data.num_workers = 0
    classifier = Classifier(model.image_tower, 2)
    classifier.load_state_dict(load_file(str(out / "model.safetensors")))
    classifier.eval()
    test = {k: m for k, m in split_samples(str(work / "pre"), "val")
            if len({"No Finding", "Opacity"} & set(m["labels"])) == 1}
    probs, truth = [], []
    with torch.no_grad():
        for key, image, m in items(cfg, str(work / "pre"), "val", tokenizer, frozenset(test)):
            probs.append(torch.softmax(classifier(image[None]).double(), 1)[0, 1].item())
            truth.append("Opacity" in m["labels"])
    assert len(probs) == doc["num_samples"]
    accuracy = 100 * np.mean([(p > 0.5) == t for p, t in zip(probs, truth)])
    assert doc["accuracy"] == pytest.approx(accuracy)
    assert doc["auroc/Opacity"] == pytest.approx(100 * _naive_auroc(probs, truth), abs=1e-6)
    print(f"classify test: AUROC {doc['auroc']:.1f}, accuracy {doc['accuracy']:.1f}, balanced accuracy "
          f"{doc['balanced_accuracy']:.1f} on {doc['num_samples']:.0f} images, {doc['num_train']:.0f} training labels")
    assert doc["auroc"] > 80, doc  # chance is 50

    # multi-label, image tower locked but for its last group: the locked part comes out as it went in
    stdout = _run("unimlip_train.cli.finetune", "classify", "--checkpoint", str(work / "run"), "--data",
                  str(work / "pre"), "--label-key", "labels", "--classes", "Opacity,Pleural Effusion,Cardiomegaly",
                  "--multi-label", "--lock-image", "--unlocked-groups", "1", "--epochs", "1", "--test-split", "val",
                  "--workers", "0", "--out", str(tmp_path / "ml"))
    ml = json.loads(stdout.strip().splitlines()[-1])
    per_class = [ml[f"auroc/{c}"] for c in ("Opacity", "Pleural Effusion", "Cardiomegaly")]
    # the data's val is the test split here: the epoch is chosen on a part of train, said so, never on val
    assert ml["auroc"] == pytest.approx(np.mean(per_class))
    assert ml["card"]["data"]["splits"] == {"train": "train", "val": "20% of train's groups", "test": "val"}
    assert "no validation split: the epoch is chosen on 20% of train's groups" in stdout
    tuned = load_file(str(tmp_path / "ml" / "model.safetensors"))
    before = load_for_eval(str(work / "run"))[0].image_tower.state_dict()  # `model` holds the first fine-tune now
    for k, v in before.items():
        assert torch.equal(tuned[f"image_tower.{k}"], v) != k.startswith("model.layer4.") or "num_batches" in k, k


def test_finetune_vqa_beats_the_question_only_baseline_by_15_points(work, tmp_path):
    out = tmp_path / "vqa"
    stdout = _run("unimlip_train.cli.finetune", "vqa", "--checkpoint", str(work / "run"), "--data", str(work / "vqa"),
                  "--epochs", "12", "--lr", "2e-4", "--workers", "0", "--out", str(out))
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert {"closed_accuracy", "open_accuracy", "overall_accuracy", "majority_baseline", "card"} <= set(doc)
    assert doc["card"]["tool"] == "unimlip-finetune vqa" and doc["card"]["data"]["splits"]["test"] == "test"

    # naive recomputation: accuracies from the predictions, the baseline from the training questions
    from unimlip_train.finetune.data import split_samples

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test_questions = [qa for _, m in split_samples(str(work / "vqa"), "test") for qa in m["vqa"]]
    assert sorted(p["qid"] for p in predictions) == sorted(q["qid"] for q in test_questions)
    by_question = defaultdict(Counter)
    for _, m in split_samples(str(work / "vqa"), "train"):
        for qa in m["vqa"]:
            by_question[qa["question"]][qa["answer"]] += 1
    parts = (("CLOSED", "closed_accuracy", "majority_closed"), ("OPEN", "open_accuracy", "majority_open"),
             (None, "overall_accuracy", "majority_baseline"))
    for kind, key, base_key in parts:
        chosen = [p for p in predictions if kind in (None, p["answer_type"])]
        assert doc[key] == pytest.approx(100 * np.mean([p["predicted"] == p["answer"] for p in chosen]))
        majority = [min(by_question[p["question"]].items(), key=lambda kv: (-kv[1], kv[0]))[0] for p in chosen]
        assert doc[base_key] == pytest.approx(100 * np.mean([m == p["answer"] for m, p in zip(majority, chosen)]))
    print(f"VQA test: overall {doc['overall_accuracy']:.1f} (closed {doc['closed_accuracy']:.1f}, open "
          f"{doc['open_accuracy']:.1f}) vs question-only majority {doc['majority_baseline']:.1f} "
          f"(closed {doc['majority_closed']:.1f}, open {doc['majority_open']:.1f})")
    assert doc["overall_accuracy"] >= doc["majority_baseline"] + 15, doc
    assert not math.isnan(doc["closed_accuracy"]) and not math.isnan(doc["open_accuracy"])
