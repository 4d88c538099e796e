"""The synthetic dataset (deterministic, reports state what images show) and WordPiece tokenizer building."""
from __future__ import annotations

import json
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import IU_REPORTS_TGZ as IU_TGZ
from data_prep.cli import main
from data_prep.synthetic import LOBES, generate
from data_prep.verify import iter_samples

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "unimlip_train" / "resources" / "synthetic_tokenizer"


def test_generation_is_deterministic_and_independent_of_n():
    a, b = list(generate(12, seed=3, size=64)), list(generate(12, seed=3, size=64))
    assert [s.id for s in a] == [s.id for s in b] and [s.report for s in a] == [s.report for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    prefix = list(generate(5, seed=3, size=64))
    assert [s.report for s in prefix] == [s.report for s in a[:5]]
    other = list(generate(12, seed=4, size=64))
    assert [s.report for s in other] != [s.report for s in a]
    per_group = defaultdict(int)
    for s in a:
        per_group[s.group] += 1
        assert s.image.shape == (64, 64) and s.image.dtype == np.uint8
    assert len({s.id for s in a}) == 12 and set(per_group.values()) <= {1, 2}


def _section(report: str, name: str) -> str:
    return report.split(f"{name}:", 1)[1].lower() if f"{name}:" in report else ""


def test_reports_and_labels_state_exactly_the_findings():
    for s in generate(150, seed=0, size=32):
        f, impression = s.findings, _section(s.report, "IMPRESSION")
        assert "FINDINGS:" in s.report and impression
        findings_text = s.report.split("FINDINGS:", 1)[1].split("IMPRESSION:", 1)[0].lower()
        lobes = [lobe for lobe in LOBES if lobe in findings_text]
        assert lobes == ([f.opacity[0]] if f.opacity else [])
        assert (f.opacity[0] in impression) if f.opacity else not any(lobe in impression for lobe in LOBES)
        assert ("effusion" in impression) == bool(f.effusion)
        if f.effusion:
            assert f.effusion[0] in impression and f.effusion[1] in impression
        assert ("pneumothorax" in impression) == bool(f.pneumothorax)
        if f.pneumothorax:
            assert f"{f.pneumothorax[1]} {f.pneumothorax[0]} pneumothorax" in impression
        assert (("cardiomegaly" in impression) or ("enlarged cardiac" in impression)) == f.cardiomegaly
        for device in ("pacemaker", "central venous catheter", "endotracheal tube", "nasogastric tube"):
            assert (device in impression) == (device in f.devices)
        expected = {"Opacity": f.opacity, "Pleural Effusion": f.effusion, "Cardiomegaly": f.cardiomegaly,
                    "Pneumothorax": f.pneumothorax}
        assert [k for k, v in expected.items() if v] == [l for l in s.labels if l in expected]
        assert ("No Finding" in s.labels) == (not any(expected.values()))


def _disk_mean(img: np.ndarray, x: float, y: float, r: float = 0.04) -> float:
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (xx + 0.5 - x * w) ** 2 + (yy + 0.5 - y * h) ** 2 <= (r * w) ** 2
    return float(img[mask].mean())


def test_images_show_opacities_and_pacemakers_at_low_resolution():
    """At 64 px an opacity is much brighter than the mirror-image spot in the other lung (naive disk means)."""
    checked_opacity = checked_device = 0
    for s in generate(400, seed=1, size=64):
        f = s.findings
        quiet = not (f.effusion or f.pneumothorax or f.cardiomegaly)
        img = s.image.astype(np.float64)
        if f.opacity and quiet:
            x, y = LOBES[f.opacity[0]]
            assert _disk_mean(img, x, y) - _disk_mean(img, 1 - x, y) > 30, (s.id, f.opacity)
            checked_opacity += 1
        if not (f.opacity and f.opacity[0] == "left upper lobe"):
            box = img[int(0.16 * 64) + 1:int(0.23 * 64), int(0.74 * 64) + 1:int(0.84 * 64)]
            assert (box.max() > 200) == ("pacemaker" in f.devices), s.id
            checked_device += "pacemaker" in f.devices
    assert checked_opacity > 30 and checked_device > 10


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    assert main(["synthetic", "--n", "90", "--out", str(out), "--image-size", "64", "--workers", "1",
                 "--shard-size", "32", "--val-fraction", "0.2", "--no-progress"]) == 0
    return out


def test_synthetic_command_shards_verify_and_split_by_patient(synthetic_shards):
    out = synthetic_shards
    assert main(["verify", str(out), "--decode", "--no-progress"]) == 0
    assert not (out / ".synthetic-src").exists()
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 90 and index["errors"] == 0 and index["splits"]["val"]["samples"] > 0
    reference = {s.id: s for s in generate(90, seed=0, size=64)}
    split_of_group = {}
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                assert all(m.name.endswith((".jpg", ".json", ".txt")) for m in tar.getmembers())
            for key, sample in iter_samples(out / shard["name"]):
                meta = json.loads(sample["json"])
                ref = reference.pop(key)
                assert sample["txt"].decode() == ref.report and meta["labels"] == ref.labels
                assert meta["source"] == "synthetic" and meta["orig_size"] == [64, 64] and meta["view"] in ("PA", "AP")
                assert split_of_group.setdefault(meta["group"], split) == split
    assert not reference


def _no_unk_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    pieces = [t[2:] if t.startswith("##") else t for t in tokenizer.convert_ids_to_tokens(ids)[1:-1]]
    assert "".join(pieces) == re.sub(r"\s+", "", text.lower())


def _iu_report() -> str:
    with tarfile.open(IU_TGZ) as tar:
        root = ET.fromstring(tar.extractfile("ecgen-radiology/2.xml").read())
    return " ".join((a.text or "") for a in root.iter("AbstractText") if a.get("Label") in ("FINDINGS", "IMPRESSION"))


def test_tokenizer_command_trains_a_loadable_wordpiece_vocab(synthetic_shards, tmp_path):
    from transformers import AutoTokenizer, BertTokenizer

    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(synthetic_shards), "--out", str(tok_dir), "--vocab-size", "300"]) == 0
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert (tok_dir / name).is_file()
    vocab = (tok_dir / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab)) == len(vocab)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == len(vocab)
    val = json.loads((synthetic_shards / "index.json").read_text())["splits"]["val"]["shards"][0]["name"]
    report = next(iter_samples(synthetic_shards / val))[1]["txt"].decode()  # a report not trained on
    _no_unk_round_trip(tok, report)
    _no_unk_round_trip(tok, _iu_report())  # real text: unseen words split into pieces, never [UNK]
    slow = BertTokenizer(vocab=str(tok_dir / "vocab.txt"))
    assert slow(report)["input_ids"] == tok(report)["input_ids"]
    # Same shards, same vocabulary: token ids must not depend on the run (a checkpoint pairs with its vocab).
    again = tmp_path / "tok_again"
    assert main(["tokenizer", "--data", str(synthetic_shards), "--out", str(again), "--vocab-size", "300"]) == 0
    assert (again / "vocab.txt").read_bytes() == (tok_dir / "vocab.txt").read_bytes()
    assert main(["tokenizer", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t2")]) == 2


def test_packaged_default_tokenizer_covers_synthetic_and_real_reports():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(PACKAGED))
    for s in generate(30, seed=123, size=16):
        _no_unk_round_trip(tok, s.report)
    _no_unk_round_trip(tok, _iu_report())
    words = tok.convert_ids_to_tokens(tok("left lower lobe pneumothorax effusion cardiomegaly")["input_ids"])
    assert words[1:-1] == ["left", "lower", "lobe", "pneumothorax", "effusion", "cardiomegaly"]
