"""The CSV/TSV/JSONL manifest adapter, and real IU X-ray report text through the whole writer."""
from __future__ import annotations

import argparse
import csv
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.adapters import manifest as adapter
from data_prep.cli import main
from data_prep.rows import InputError
from data_prep.verify import iter_samples

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
IU_TGZ = SHARED / "data" / "iu_xray_reports" / "NLMCXR_reports.tgz"


def _rows(path: Path, images_root: Path | None = None, *options: str) -> list:
    parser = argparse.ArgumentParser()
    adapter.add_arguments(parser)
    argv = ["--manifest", str(path)] + (["--images-root", str(images_root)] if images_root else []) + list(options)
    return list(adapter.iter_rows(parser.parse_args(argv)))


def test_csv_columns_paths_labels_and_metadata(tmp_path):
    (tmp_path / "root").mkdir()
    m = tmp_path / "m.csv"
    m.write_text('image,text,id,group,labels,view,site\n'
                 'a.png,"first, report",,p1,Opacity|Effusion,PA,north\n'
                 '\n'
                 '/abs/b.png,second,b-id,,"[""X"", ""Y""]",,south\n'
                 'c.png,third,c,p1,A; B,,\n', encoding="utf-8")
    rows = _rows(m)
    assert [r.image for r in rows] == [str(tmp_path / "a.png"), "/abs/b.png", str(tmp_path / "c.png")]
    assert [r.id for r in rows] == ["a.png", "b-id", "c"]  # id defaults to the image path
    assert [r.group for r in rows] == ["p1", "", "p1"]
    assert [r.labels for r in rows] == [["Opacity", "Effusion"], ["X", "Y"], ["A", "B"]]
    assert rows[0].text == "first, report"
    assert rows[0].metadata == {"view": "PA", "site": "north", "source": "manifest", "orig_path": "a.png"}
    assert _rows(m, tmp_path / "root")[0].image == str(tmp_path / "root" / "a.png")


def test_tsv_and_jsonl(tmp_path):
    t = tmp_path / "m.tsv"
    t.write_text("image\ttext\tgroup\nx.jpg\tsome, text\tg\n")
    (row,) = _rows(t)
    assert (row.text, row.group, row.id) == ("some, text", "g", "x.jpg")
    j = tmp_path / "m.jsonl"
    j.write_text(json.dumps({"image": "y.png", "text": "t", "labels": ["L1"], "extra": {"k": 1}, "source": "mine"})
                 + "\n\n" + json.dumps({"image": "z.png", "text": None, "id": 5}) + "\n")
    a, b = _rows(j)
    assert a.labels == ["L1"] and a.metadata["extra"] == {"k": 1} and a.metadata["source"] == "mine"
    assert (b.id, b.text) == ("5", "")  # an empty report is the writer's skipped row, not an input error


@pytest.mark.parametrize("text,needle", [
    ("image,text\n,hello\n", ":2: 'image' must be a non-empty path"),
    ("text\nhello\n", ":1: missing required column(s) image"),
    ("", "empty manifest"),
    ("image,text\n\n", "no rows"),
])
def test_csv_input_errors_name_file_and_line(tmp_path, text, needle):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(InputError) as e:
        _rows(m)
    assert str(m) in str(e.value) and needle in str(e.value)


def _iu_reports(tmp_path: Path, n: int) -> list[dict]:
    """The first n IU X-ray reports with FINDINGS or IMPRESSION and at least one image, parsed here."""
    wanted = {f"ecgen-radiology/{i}.xml" for i in range(1, 4 * n)}
    with tarfile.open(IU_TGZ) as tar:
        members = [m for m in tar.getmembers() if m.name in wanted]
        tar.extractall(tmp_path / "iu", members=members, filter="data")
    reports = []
    for i in range(1, 4 * n):
        root = ET.parse(tmp_path / "iu" / "ecgen-radiology" / f"{i}.xml").getroot()
        sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
        images = [p.get("id") for p in root.iter("parentImage")]
        text = " ".join(f"{k}: {sections[k]}" for k in ("FINDINGS", "IMPRESSION") if sections.get(k))
        if text and images:
            reports.append({"uid": str(i), "text": text, "images": images,
                            "labels": [m.text for m in root.iter("major") if m.text]})
        if len(reports) == n:
            break
    return reports


def test_real_iu_xray_text_round_trips_through_shards(tmp_path):
    reports = _iu_reports(tmp_path, 30)
    img_dir = tmp_path / "png"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    with open(tmp_path / "iu.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "text", "group", "labels"])
        for r in reports:
            for image_id in r["images"]:
                Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8)).save(img_dir / f"{image_id}.png")
                w.writerow([image_id, f"{image_id}.png", r["text"], r["uid"], "|".join(r["labels"])])
                expected[image_id] = r
    out = tmp_path / "shards"
    assert main(["manifest", "--manifest", str(tmp_path / "iu.csv"), "--images-root", str(img_dir), "--out", str(out),
                 "--workers", "1", "--val-fraction", "0.3", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == len(expected) and index["errors"] == 0
    split_of_report = {}
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            for key, sample in iter_samples(out / shard["name"]):
                meta = json.loads(sample["json"])
                r = expected.pop(meta["id"])
                assert sample["txt"].decode("utf-8") == r["text"]
                assert meta["labels"] == r["labels"] and meta["group"] == r["uid"]
                assert re.fullmatch(r"[A-Za-z0-9_-]+", key)
                assert split_of_report.setdefault(r["uid"], split) == split  # a report's images stay together
    assert not expected
    assert any(len(r["images"]) > 1 for r in reports) and len(set(split_of_report.values())) == 2
