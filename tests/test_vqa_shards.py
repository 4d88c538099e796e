"""VQA shards: VQA-RAD's and SLAKE's public formats with their official splits, the manifest form, and the synthetic
VQA set whose answers the image decides. Real tar shards read back member by member."""
from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import synthetic, synthetic_vqa
from data_prep.cli import main


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48), value, np.uint8)).save(path)


def _samples(out: Path) -> dict[str, list[dict]]:
    """split -> the json metadata (+ key, text) of every sample in its tars."""
    found = defaultdict(list)
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                found[tar_path.name.split("-")[0]].append(
                    {**json.loads(data), "key": key, "txt": members[key + ".txt"].decode()})
    return dict(found)


def _shard(*argv: str) -> int:
    return main([*argv, "--workers", "1", "--no-progress"])


def test_vqa_rad_keeps_its_official_test_split_and_every_field(tmp_path):
    images = tmp_path / "VQA_RAD Image Folder"
    records = []
    for i, (image, phrase, answer, kind) in enumerate([
            ("synpic1.jpg", "freeform", "yes", "CLOSED"), ("synpic1.jpg", "para", "Left", "OPEN"),
            ("synpic1.jpg", "test_freeform", 2, "CLOSED "), ("synpic2.jpg", "frame", "no", "CLOSED"),
            ("synpic2.jpg", "test_para", "liver", "OPEN"), ("synpic3.jpg", "freeform", "axial", "OPEN")]):
        _image(images / image, 30 * i)
        records.append({"qid": 100 + i, "image_name": image, "question": f"Question {i}?", "answer": answer,
                        "answer_type": kind, "question_type": "PRES", "phrase_type": phrase, "image_organ": "CHEST"})
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(records))
    assert _shard("vqa-rad", "--json", str(path), "--images", str(images), "--out", str(tmp_path / "out")) == 0

    got = _samples(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {s: v["samples"] for s, v in index["splits"].items()} == {"train": 3, "test": 2}
    expected = defaultdict(list)  # naive: (image, split) -> its records
    for r in records:
        expected[r["image_name"], "test" if r["phrase_type"].startswith("test") else "train"].append(r)
    for split, samples in got.items():
        for sample in samples:
            want = expected[sample["orig_path"], split]
            assert sample["group"] == sample["orig_path"] and sample["split"] == split
            assert [q["qid"] for q in sample["vqa"]] == [r["qid"] for r in want]
            for q, r in zip(sample["vqa"], want):
                assert q["answer"] == str(r["answer"]) and q["answer_type"] == r["answer_type"].strip()
                assert (q["phrase_type"], q["question_type"], q["image_organ"]) == (r["phrase_type"], "PRES", "CHEST")
            assert sample["txt"].splitlines() == [f"{r['question']} {r['answer']}" for r in want]
    assert len(got["train"]) + len(got["test"]) == len(expected)

    records.append({"qid": 9, "image_name": "synpic3.jpg", "question": "Q?", "answer": "x", "answer_type": "MAYBE"})
    path.write_text(json.dumps(records))
    assert _shard("vqa-rad", "--json", str(path), "--images", str(images), "--out", str(tmp_path / "bad")) == 2


def test_vqa_question_files_that_are_not_question_lists_name_the_file(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for text, message in [("{not json", "not a JSON file"), ('{"a": 1}', "expected a JSON list of questions"),
                          ('[{"image_name": "x.jpg", "question": "q?"}]', "record 0: needs the fields")]:
        path = tmp_path / "q.json"
        path.write_text(text)
        assert _shard("vqa-rad", "--json", str(path), "--images", str(images), "--out", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err


def test_slake_keeps_train_validate_test_and_english_by_default(tmp_path):
    root = tmp_path / "Slake1.0"
    per_file = {"train.json": ("xmlab1", "xmlab2"), "validate.json": ("xmlab3",), "test.json": ("xmlab4",)}
    for n, (name, folders) in enumerate(per_file.items()):
        records = []
        for j, folder in enumerate(folders):
            _image(root / "imgs" / folder / "source.jpg", 40 * n + j)
            for lang in ("en", "zh"):
                records.append({"img_id": int(folder[5:]), "img_name": f"{folder}/source.jpg", "question": f"{lang} q?",
                                "answer": "Yes" if lang == "en" else "是", "q_lang": lang, "answer_type": "CLOSED",
                                "content_type": "Abnormality", "base_type": "vqa", "qid": 10 * n + j})
        (root / name).write_text(json.dumps(records, ensure_ascii=False))
    assert _shard("slake", "--root", str(root), "--out", str(tmp_path / "en")) == 0
    got = _samples(tmp_path / "en")
    assert {s: len(v) for s, v in got.items()} == {"train": 2, "val": 1, "test": 1}
    assert all([q["q_lang"] for q in s["vqa"]] == ["en"] for v in got.values() for s in v)
    assert {s["orig_path"] for s in got["val"]} == {"xmlab3/source.jpg"}
    assert _shard("slake", "--root", str(root), "--all-languages", "--out", str(tmp_path / "all")) == 0
    assert all(len(s["vqa"]) == 2 for v in _samples(tmp_path / "all").values() for s in v)
    (root / "test.json").unlink()
    assert _shard("slake", "--root", str(root), "--out", str(tmp_path / "missing")) == 2


def test_vqa_manifest_keeps_given_splits_and_names_the_bad_line(tmp_path, capsys):
    for i in range(4):
        _image(tmp_path / "root" / "img" / f"{i}.png", 50 * i)
    _image(tmp_path / "elsewhere.png", 7)
    rows = [["image", "question", "answer", "answer_type", "split", "modality"],
            ["img/0.png", "Is it normal?", "yes", "", "train", "CT"],
            ["img/0.png", "Which organ?", "lung", "OPEN", "train", "CT"],
            ["img/1.png", "Is it normal?", "no", "CLOSED", "test", "MRI"],
            ["img/2.png", "Is it normal?", "yes", "", "validate", "X"],
            ["img/3.png", "Is it normal?", "no", "", "train", "X"],
            ["../elsewhere.png", "Is it normal?", "no", "", "test", "X"]]
    path = tmp_path / "vqa.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert _shard("vqa-manifest", "--manifest", str(path), "--images-root", str(tmp_path / "root"),
                  "--out", str(tmp_path / "out")) == 0
    got = _samples(tmp_path / "out")
    by_image = {s["orig_path"]: (split, s) for split, v in got.items() for s in v}
    assert {k: v[0] for k, v in by_image.items()} == {"img/0.png": "train", "img/1.png": "test", "img/2.png": "val",
                                                       "img/3.png": "train"}
    first = by_image["img/0.png"][1]["vqa"]
    assert [(q["answer"], q["answer_type"], q["modality"]) for q in first] == [("yes", "CLOSED", "CT"),
                                                                               ("lung", "OPEN", "CT")]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "outside --images-root" in errors[0]["reason"]  # the path never left its root

    rows[3][3] = "SOMETIMES"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert _shard("vqa-manifest", "--manifest", str(path), "--out", str(tmp_path / "bad")) == 2
    assert f"{path}:4: answer_type 'SOMETIMES'" in capsys.readouterr().err


def _naive_answer(question: str, f: dict) -> str:
    """The answer a radiologist would read off the drawn findings (independent of synthetic_vqa's table)."""
    yes_no = {"Is there a pleural effusion?": f["effusion"] is not None,
              "Is the heart enlarged?": f["cardiomegaly"], "Is there a pneumothorax?": f["pneumothorax"] is not None,
              "Is there an opacity in the right lung?": f["opacity"] is not None and "right" in f["opacity"][0],
              "Is there an opacity in the left lung?": f["opacity"] is not None and "left" in f["opacity"][0],
              "Is a pacemaker present?": "pacemaker" in f["devices"]}
    if question in yes_no:
        return "yes" if yes_no[question] else "no"
    return {"Which side is the pleural effusion on?": (f["effusion"] or [None])[0],
            "Which side is the pneumothorax on?": (f["pneumothorax"] or [None])[0],
            "Which lobe is the opacity in?": (f["opacity"] or [None])[0],
            "How many devices are visible?": str(len(f["devices"]))}[question]


def test_synthetic_vqa_answers_are_decided_by_the_image(tmp_path):
    out = tmp_path / "vqa"
    assert _shard("synthetic-vqa", "--n", "60", "--image-size", "32", "--max-size", "32", "--out", str(out),
                  "--seed", "4") == 0
    got = _samples(out)
    assert set(got) == {"train", "val", "test"}
    groups = {split: {s["group"] for s in v} for split, v in got.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])  # split by patient
    assert not (out / synthetic.SOURCE_DIR).exists()
    drawn = {s.id: s for s in synthetic.generate(60, seed=4, size=32)}  # the very images of `synthetic`
    n_questions = 0
    for sample in (s for v in got.values() for s in v):
        source = drawn[sample["orig_path"]]
        assert sample["findings"] == source.findings.as_dict() and sample["group"] == source.group
        for q in sample["vqa"]:
            assert q["answer"] == _naive_answer(q["question"], sample["findings"]), q
            assert q["answer_type"] == ("CLOSED" if q["answer"] in ("yes", "no") else "OPEN")
            n_questions += 1
    assert n_questions >= 60

    # "yes" about half of the time for every closed question, so the question alone cannot tell the answer
    rng = np.random.default_rng(0)
    asked = defaultdict(Counter)
    for _ in range(6000):
        findings = synthetic.sample_findings(rng).as_dict()
        for question, answer in synthetic_vqa.questions(findings, rng):
            asked[question][answer] += 1
    for question, counts in asked.items():
        if set(counts) <= {"yes", "no"}:
            assert 0.44 < counts["yes"] / sum(counts.values()) < 0.56, (question, counts)
    counts = asked["How many devices are visible?"]
    assert max(counts.values()) / sum(counts.values()) < 0.45
