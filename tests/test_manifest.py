"""The CSV/TSV/JSONL manifest adapter, and real IU X-ray report text through the whole writer."""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import IU_REPORTS_TGZ as IU_TGZ
from conftest import extract_members
from data_prep.adapters import manifest as adapter
from data_prep.cli import main
from data_prep.verify import iter_samples
from unimlip_train.format.rows import InputError


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


def test_non_utf8_byte_is_reported_with_its_line(tmp_path):
    m = tmp_path / "m.csv"
    lines = [b"image,text\n"] + [f"img{i}.png,report {i}\n".encode() for i in range(2, 1501)]
    m.write_bytes(b"".join(lines) + b"img1501.png,caf\xe9 report\n" + b"img1502.png,fine\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(m))}:1501: not UTF-8"):
        _rows(m)


def test_official_split_column_is_kept(tmp_path):
    for i, name in enumerate(("a", "b", "c", "d")):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * (i + 1)).save(tmp_path / f"{name}.png")
    m = tmp_path / "m.csv"
    m.write_text("image,text,group,split\na.png,one,p1,train\nb.png,two,p1,test\nc.png,three,p2,validate\n"
                 "d.png,four,p3,TRAIN\n")
    assert [r.split for r in _rows(m)] == ["train", "test", "val", "train"]
    out = tmp_path / "out"
    assert main(["manifest", "--manifest", str(m), "--out", str(out), "--val-fraction", "0.5", "--workers", "1",
                 "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert {s: v["samples"] for s, v in index["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    # patient p1 is in train and test by the official split: the within-set audit reports it
    assert index["audit"]["shared_groups"] == 1 and index["audit"]["leaks"] >= 1
    assert {x["split"] for x in index["audit"]["cross_split"][0]["samples"]} == {"train", "test"}
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text,split\na.png,one,train\nb.png,two,holdout\n")
    with pytest.raises(InputError, match=r"bad.csv:3: split 'holdout'"):
        _rows(bad)


def test_paths_must_stay_inside_images_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    for folder in (root, outside):
        Image.fromarray(np.full((8, 8), 90, np.uint8)).save(folder / "x.png")
    (root / "link.png").symlink_to(outside / "x.png")
    m = tmp_path / "m.csv"
    m.write_text(f"image,text\nx.png,inside\n../elsewhere/x.png,dotdot\n{outside / 'x.png'},absolute\n"
                 f"link.png,symlink\n{root / 'x.png'},absolute inside\n")
    rows = _rows(m, root)
    assert [bool(r.skip) for r in rows] == [False, True, True, True, False]
    assert all("outside --images-root" in r.skip and "--allow-outside-root" in r.skip for r in rows if r.skip)
    assert not any(r.skip for r in _rows(m, root, "--allow-outside-root"))
    assert not any(r.skip for r in _rows(m))  # without --images-root: paths as given, as before
    out = tmp_path / "out"
    assert main(["manifest", "--manifest", str(m), "--images-root", str(root), "--out", str(out), "--val-fraction", "0",
                 "--workers", "1", "--no-progress"]) == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(["../elsewhere/x.png", str(outside / "x.png"), "link.png"])


def test_group_views_study_one_sample_per_study(tmp_path):
    for name, value in (("s1_lat", 40), ("s1_pa", 120), ("s1_ap", 200), ("s2_pa", 60), ("s3_x", 10)):
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(tmp_path / f"{name}.png")
    m = tmp_path / "m.csv"
    m.write_text("image,text,study,group,view,labels\n"
                 "s1_lat.png,IMPRESSION: Clear.,st1,p1,LATERAL,A\ns1_pa.png,IMPRESSION: Clear.,st1,p1,PA,B\n"
                 "s1_ap.png,impression:   clear.,st1,p1,AP,\ns2_pa.png,Other report.,st2,p2,PA,\n"
                 "s3_x.png,Third.,st3,p3,,\n")
    rows = {r.id: r for r in _rows(m, None, "--group-views", "study", "--max-views", "2")}
    assert sorted(rows) == ["st1", "st2", "st3"]
    st1 = rows["st1"]
    assert [(v.position, v.name) for v in st1.views] == [("PA", "s1_pa.png"), ("AP", "s1_ap.png")]  # frontal first
    assert st1.metadata["views_in_study"] == 3 and st1.metadata["views_kept"] == 2 and st1.group == "p1"
    assert st1.labels == ["A", "B"] and st1.text == "IMPRESSION: Clear."
    out = tmp_path / "out"
    assert main(["manifest", "--manifest", str(m), "--out", str(out), "--val-fraction", "0", "--group-views", "study",
                 "--max-views", "2", "--workers", "2", "--no-progress"]) == 0
    samples = {key: sample for shard in json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]
               for key, sample in iter_samples(str(out / shard["name"]))}
    assert set(samples["st1"]) == {"jpg", "view1.jpg", "json", "txt"}
    meta = json.loads(samples["st1"]["json"])
    assert [(v["member"], v["view"]) for v in meta["views"]] == [("jpg", "PA"), ("view1.jpg", "AP")]
    for member, value in (("jpg", 120), ("view1.jpg", 200)):  # each member is the image its entry names
        assert abs(int(np.asarray(Image.open(io.BytesIO(samples["st1"][member]))).mean()) - value) <= 2
    assert meta["view"] == "PA" and meta["pixel_sha256"] == meta["views"][0]["pixel_sha256"]
    assert set(samples["st3"]) == {"jpg", "json", "txt"} and len(json.loads(samples["st3"]["json"])["views"]) == 1
    assert main(["verify", str(out), "--decode", "--no-progress"]) == 0  # every listed view present and decodable


def test_16bit_png_window_rules(tmp_path):
    rng = np.random.default_rng(0)
    twelve_bit = rng.integers(0, 4096, (40, 40)).astype(np.uint16)  # a 12-bit film stored in 16 bits
    twelve_bit[0, 0] = 60000  # one hot pixel
    Image.fromarray(twelve_bit).save(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("image,text\nx.png,report\n")
    stored = {}
    for window in ("auto", "minmax", "none"):
        out = tmp_path / window
        assert main(["manifest", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--val-fraction", "0",
                     "--window", window, "--workers", "1", "--no-progress"]) == 0
        ((_, sample),) = iter_samples(str(out / "train-000000.tar"))
        stored[window] = np.asarray(Image.open(io.BytesIO(sample["jpg"]))).astype(np.float64)
    values = np.sort(twelve_bit.ravel().astype(np.float64))
    low, high = np.percentile(values, 0.5), np.percentile(values, 99.5)
    expect = {"auto": np.clip((twelve_bit - low) / (high - low), 0, 1) * 255,
              "minmax": twelve_bit / 60000 * 255, "none": twelve_bit / 257}
    for window, reference in expect.items():  # JPEG-coded: compare means, and the spread that matters
        assert abs(stored[window].mean() - reference.mean()) < 3, window
    assert stored["auto"].mean() > 100 and stored["minmax"].mean() < 15 and stored["none"].mean() < 15


def _iu_reports(tmp_path: Path, n: int) -> list[dict]:
    """The first n IU X-ray reports with FINDINGS or IMPRESSION and at least one image, parsed here."""
    wanted = {f"ecgen-radiology/{i}.xml" for i in range(1, 4 * n)}
    with tarfile.open(IU_TGZ) as tar:
        members = [m for m in tar.getmembers() if m.name in wanted]
        extract_members(tar, tmp_path / "iu", members)
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


def test_a_long_report_is_a_skipped_row_from_csv_and_jsonl_alike(tmp_path):
    """A report over csv's own 128 KiB field limit is sharded; one over --max-report-bytes is a skipped row with
    its reason (CSV and JSONL the same), never a stopped run; only a field beyond 16 x the limit stops it."""
    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / f"{i}.png")
    long_ok = "FINDINGS: " + "stable nodule. " * 14_000  # 210 KB
    too_long = "FINDINGS: " + "stable nodule. " * 100_000  # 1.5 MB
    rows = [{"image": "0.png", "text": long_ok}, {"image": "1.png", "text": too_long},
            {"image": "2.png", "text": "IMPRESSION: clear."}]
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--val-fraction", "0", "--workers", "1", "--no-progress", "--no-audit"]
    for name, line in (("m.csv", 3), ("m.jsonl", 2)):
        out = tmp_path / f"out_{name}"
        assert main(["manifest", "--manifest", str(tmp_path / name), "--out", str(out), *common]) == 0
        index = json.loads((out / "index.json").read_text())
        (error,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
        assert index["samples"] == 2 and error["image"].endswith("1.png")
        assert error["reason"] == (f"{tmp_path / name}:{line}: report of {len(too_long)} bytes is longer than "
                                   "--max-report-bytes 1048576")
        texts = [s["txt"].decode() for _, s in iter_samples(out / "train-000000.tar")]
        assert max(map(len, texts)) > 200_000  # the long report itself, not a cut of it
        small = tmp_path / f"small_{name}"
        assert main(["manifest", "--manifest", str(tmp_path / name), "--out", str(small), "--max-report-bytes",
                     "100000", *common]) == 0
        assert json.loads((small / "index.json").read_text())["samples"] == 1
    with pytest.raises(InputError, match=r"m\.csv:3: malformed CSV \(field larger than field limit .*raise "
                                         r"--max-report-bytes"):
        _rows(tmp_path / "m.csv", None, "--max-report-bytes", "50000")
