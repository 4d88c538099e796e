"""Study samples (several images of one study, written by ``--group-views study``) through the training and
evaluation loaders: ``data.view`` random / frontal / pair, exact resume, and the report sections actually used."""
from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

from data_prep.cli import main as shard_main
from unimlip_train.config.schema import Config
from unimlip_train.data.collate import BatchNeeds
from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.text import model_text
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.data.transforms import MEAN, STD
from unimlip_train.format.report_text import report_id

LEVEL = {"PA": 40, "AP": 110, "LATERAL": 200}  # each view position has its own grey level
STUDIES = 24


def _text(i: int) -> str:
    return f"FINDINGS: lungs {i} clear.\nIMPRESSION: normal {i}."


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    rng = np.random.default_rng(0)
    rows = [["image", "text", "study", "group", "view"]]
    for i in range(STUDIES):
        views = ["PA", "LATERAL"] if i % 3 == 0 else ["AP", "LATERAL", "PA"] if i % 3 == 1 else ["LATERAL"]
        for view in views:
            pixels = np.clip(LEVEL[view] + rng.normal(0, 3, (48, 48)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{i}_{view}.png")
            rows.append([f"{i}_{view}.png", _text(i), f"st{i:02d}", f"p{i}", view])
    with open(root / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert shard_main(["manifest", "--manifest", str(root / "m.csv"), "--out", str(root / "out"), "--group-views",
                       "study", "--val-fraction", "0", "--workers", "1", "--no-progress"]) == 0
    return str(root / "out")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "lungs", "clear", "normal"] + [str(d) for d in range(10)]
    BertTokenizer(vocab={w: k for k, w in enumerate(vocab)}).save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def make_cfg(train: str, view: str, **text) -> Config:
    cfg = Config()
    cfg.data.train, cfg.data.view, cfg.data.image_size, cfg.data.num_workers = train, view, 32, 1
    cfg.data.shuffle_buffer, cfg.train.micro_batch_size = 8, 4
    cfg.data.augment = cfg.data.augment[:1]  # the crop and warp alone: grey levels stay readable
    for key, value in text.items():
        setattr(cfg.data.text, key, value)
    return cfg


def position(images: torch.Tensor) -> list[str]:
    """The view position each image came from, by the grey level at its centre (crops keep the centre's level)."""
    centre = images[:, 0, 12:20, 12:20].mean(dim=(1, 2)) * STD[1][0] + MEAN[1][0]
    return [min(LEVEL, key=lambda v: abs(LEVEL[v] - float(c) * 255)) for c in centre]


def epochs(cfg, tokenizer, needs, n=2) -> list[dict]:
    stream = TrainStream(cfg, tokenizer, needs, 0, 1)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == n * stream.steps_per_epoch:
            return batches


def views_of(study_dir) -> dict:
    index = json.load(open(f"{study_dir}/index.json"))
    from data_prep.verify import iter_samples

    return {key: [v["view"] for v in json.loads(s["json"])["views"]]
            for shard in index["splits"]["train"]["shards"] for key, s in iter_samples(f"{study_dir}/{shard['name']}")}


def test_pair_gives_two_different_images_of_a_study(study_dir, tokenizer):
    studies = views_of(study_dir)
    assert studies["st00"] == ["PA", "LATERAL"] and studies["st01"] == ["PA", "AP", "LATERAL"]  # frontal first
    for batch in epochs(make_cfg(study_dir, "pair"), tokenizer, BatchNeeds(image_view2=True)):
        for key, one, two in zip(batch["key"], position(batch["image"]), position(batch["image_view2"])):
            assert one in studies[key] and two in studies[key]
            assert (one != two) == (len(studies[key]) > 1), key  # a one-image study: the augmented copy


def test_frontal_prefers_pa_ap_and_random_uses_every_view(study_dir, tokenizer):
    studies = views_of(study_dir)
    for batch in epochs(make_cfg(study_dir, "frontal"), tokenizer, BatchNeeds()):
        for key, seen in zip(batch["key"], position(batch["image"])):
            assert seen in ("PA", "AP") if len(studies[key]) > 1 else seen == "LATERAL"
    picked = Counter()
    runs = [epochs(make_cfg(study_dir, "random"), tokenizer, BatchNeeds(), n=4) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a["image"], b["image"])  # seeded
        for key, seen in zip(a["key"], position(a["image"])):
            assert seen in studies[key]
            picked[(len(studies[key]), seen)] += 1
    assert picked[(2, "PA")] > 0 and picked[(2, "LATERAL")] > 0 and picked[(3, "AP")] > 0


def test_pair_resume_is_exact(study_dir, tokenizer):
    cfg, needs = make_cfg(study_dir, "pair"), BatchNeeds(image_view2=True, text_view2=True, mlm=True)
    full = epochs(cfg, tokenizer, needs)
    first = TrainStream(cfg, tokenizer, needs, 0, 1)
    head = [b for _, b in zip(range(5), first)]
    resumed = TrainStream(cfg, tokenizer, needs, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [b for _, b in zip(range(len(full) - 5), resumed)]
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"]
        for name in ("image", "image_view2", "input_ids", "mlm_input_ids", "report_id"):
            assert torch.equal(a[name], b[name]), name


def test_random_sections_and_the_report_id_of_the_text_used(study_dir, tokenizer):
    chosen = Counter()
    for batch in epochs(make_cfg(study_dir, "random", sections="random"), tokenizer, BatchNeeds()):
        for key, rid in zip(batch["key"], batch["report_id"].tolist()):
            text = _text(int(key[2:]))
            options = {report_id(model_text(text, "impression")): "impression",
                       report_id(model_text(text, "findings")): "findings"}
            chosen[options[rid]] += 1  # a KeyError here: the id is not of a text the sample could have used
    assert chosen["impression"] > 0 and chosen["findings"] > 0


def test_eval_reads_the_first_frontal_image_and_the_ordered_sections(study_dir, tokenizer):
    cfg = make_cfg(study_dir, "random", order="findings_first")
    studies = views_of(study_dir)
    for batch in build_eval_loader(cfg, study_dir, tokenizer, 5, 0, 1, split="train"):
        for key, seen, text in zip(batch["key"], position(batch["image"]), batch["text"]):
            assert seen == studies[key][0]  # frontal first in the stored order, so the first image
            assert text == model_text(_text(int(key[2:])), "findings+impression", "findings_first")
            assert text.startswith("lungs")
