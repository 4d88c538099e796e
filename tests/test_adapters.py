"""The IU X-ray, MIMIC-CXR and ROCO adapters on real inputs (the Open-I report archive, pydicom's DICOM files),
on broken inputs, and end to end through ``unimlip-shard`` into real tar shards."""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import IU_REPORTS_TGZ as IU_TGZ
from conftest import extract_members
from data_prep.adapters import iu_xray, mimic_cxr, roco
from data_prep.cli import main as shard_main
from data_prep.dicom import read_dicom
from unimlip_train.format.rows import InputError


def rows_of(adapter, argv: list[str]) -> list:
    parser = argparse.ArgumentParser()
    adapter.add_arguments(parser)
    return list(adapter.iter_rows(parser.parse_args(argv)))


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard listed in index.json."""
    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for split in index["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def png_or_jpeg(path: Path, size: tuple[int, int] = (40, 32)) -> None:
    Image.fromarray(np.arange(size[0] * size[1], dtype=np.uint8).reshape(size[1], size[0])).save(path)


# ---------------------------------------------------------------- IU X-ray


@pytest.fixture(scope="module")
def iu_rows(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no_images")
    return rows_of(iu_xray, ["--reports", str(IU_TGZ), "--images", str(empty)])


def naive_iu_archive() -> dict[str, dict]:
    """report stem -> image ids, whether FINDINGS/IMPRESSION hold any word, MeSH head terms (regex, no XML parser)."""
    reports = {}
    with tarfile.open(IU_TGZ) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            xml = tar.extractfile(member).read().decode("utf-8")
            body = " ".join(re.findall(r'<AbstractText Label="(?:FINDINGS|IMPRESSION)">([^<]*)</AbstractText>', xml))
            heads: list[str] = []
            for tag in re.findall(r"<major>([^<]*)</major>", xml):
                head = tag.split("/")[0].strip()
                if head and head not in heads:
                    heads.append(head)
            reports[member.name.rsplit("/", 1)[-1][:-4]] = {
                "images": re.findall(r'<parentImage id="([^"]+)"', xml),
                "has_text": re.search(r"[A-Za-z0-9]", body.replace("XXXX", "")) is not None,
                "labels": heads,
            }
    return reports


def test_iu_real_archive_rows_match_an_independent_count(iu_rows):
    naive = naive_iu_archive()
    assert len(naive) == 3955
    pairs = sum(len(r["images"]) for r in naive.values())
    with_text = sum(len(r["images"]) for r in naive.values() if r["has_text"])
    assert len(iu_rows) == pairs  # every (report, image) pair is yielded; the writer skips the empty ones
    assert sum(1 for row in iu_rows if row.text) == with_text
    assert len({row.id for row in iu_rows}) == len(iu_rows)
    for row in iu_rows:
        assert row.id in naive[row.group]["images"]
        assert row.labels == naive[row.group]["labels"]
        assert "XXXX" not in row.text and row.metadata["source"] == "iu-xray"
        assert row.image.endswith(f"/{row.id}.png")


def test_iu_report_2_spot_check(iu_rows):
    study = [row for row in iu_rows if row.group == "2"]
    assert [row.id for row in study] == ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"]
    text = study[0].text
    assert text.startswith("FINDINGS: Borderline cardiomegaly. Midline sternotomy. Enlarged pulmonary arteries. "
                           "Clear lungs.")  # headers kept, one section a line: the loader chooses and orders them
    assert text.endswith("\nIMPRESSION: No acute pulmonary findings.")
    assert study[0].labels == ["Cardiomegaly", "Pulmonary Artery"]
    assert study[0].metadata["mesh"] == ["Cardiomegaly/borderline", "Pulmonary Artery/enlarged"]
    assert study[1].text == text


def test_iu_extracted_folder_sections_and_images(tmp_path, iu_rows):
    with tarfile.open(IU_TGZ) as tar:
        chosen = [m for m in tar.getmembers() if re.search(r"/(?:[1-9]|1[0-9])\.xml$", m.name)]
        extract_members(tar, tmp_path / "reports", chosen)
    images = tmp_path / "images"
    images.mkdir()
    png_or_jpeg(images / "CXR2_IM-0652-1001.png")
    rows = rows_of(iu_xray, ["--reports", str(tmp_path / "reports"), "--images", str(images)])
    from_tgz = [row for row in iu_rows if row.group in {str(i) for i in range(1, 20)}]
    assert [(r.id, r.text, r.labels, r.group) for r in rows] == [(r.id, r.text, r.labels, r.group) for r in from_tgz]
    assert rows[[r.id for r in rows].index("CXR2_IM-0652-1001")].image == str(images / "CXR2_IM-0652-1001.png")

    impression = rows_of(iu_xray, ["--reports", str(tmp_path / "reports"), "--images", str(images),
                                   "--sections", "impression", "--deid-placeholder", "[deid]"])
    assert [r.text for r in impression if r.group == "2"][0] == "IMPRESSION: No acute pulmonary findings."
    assert any("[deid]" in r.text for r in rows_of(iu_xray, ["--reports", str(tmp_path / "reports"), "--images",
                                                             str(images), "--deid-placeholder", "[deid]"]))


def test_iu_input_errors(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(InputError, match="nowhere.tgz"):
        rows_of(iu_xray, ["--reports", str(tmp_path / "nowhere.tgz"), "--images", str(images)])
    with pytest.raises(InputError, match="no_such_images"):
        rows_of(iu_xray, ["--reports", str(IU_TGZ), "--images", str(tmp_path / "no_such_images")])
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "1.xml").write_text('<eCitation>\n<parentImage id="a">\n</eCitation>\n')
    with pytest.raises(InputError, match=r"1\.xml:3: not well-formed"):
        rows_of(iu_xray, ["--reports", str(reports), "--images", str(images)])


def test_iu_end_to_end_shards(tmp_path):
    with tarfile.open(IU_TGZ) as tar:
        chosen = [m for m in tar.getmembers() if m.name.endswith(("/1.xml", "/2.xml", "/4.xml"))]
        extract_members(tar, tmp_path / "reports", chosen)
    images = tmp_path / "images"
    images.mkdir()
    for image_id in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR2_IM-0652-2001"):
        png_or_jpeg(images / f"{image_id}.png")
    rows = rows_of(iu_xray, ["--reports", str(tmp_path / "reports"), "--images", str(images)])
    out = tmp_path / "shards"
    code = shard_main(["iu-xray", "--reports", str(tmp_path / "reports"), "--images", str(images), "--out", str(out),
                       "--workers", "1", "--no-progress"])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["splits"].values()) == 4
    assert index["errors"] == len(rows) - 4  # report 4's images are not in the folder
    samples = read_shards(out)
    assert set(samples) == {r.id.replace(".", "_") for r in rows if (images / f"{r.id}.png").exists()}
    for row in rows:
        if row.id in samples:
            assert samples[row.id]["txt"].decode() == row.text
            meta = json.loads(samples[row.id]["json"])
            assert meta["group"] == row.group and meta["labels"] == row.labels and meta["source"] == "iu-xray"


# ---------------------------------------------------------------- MIMIC-CXR

REPORT_SECTIONS = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
REPORT_COMBINED = """ FINAL REPORT
 INDICATION: Dyspnea.
 FINDINGS AND IMPRESSION: No pneumothorax. ___ lines are unchanged
"""
REPORT_PLAIN = "Portable chest radiograph.\nLungs are clear.\n"


def mimic_tree(root: Path) -> dict[str, Path]:
    """A small MIMIC-CXR layout from real DICOM fixtures and hand-written reports; returns dicom_id -> source."""
    files = root / "files"
    study1 = files / "p10" / "p10000032" / "s50414267"
    study2 = files / "p10" / "p10000032" / "s53189527"
    study3 = files / "p11" / "p11000011" / "s55000001"
    study4 = files / "p11" / "p11000011" / "s56000000"
    for folder in (study1, study2, study3, study4):
        folder.mkdir(parents=True)
    sources = {
        "a1": get_testdata_file("CT_small.dcm"), "b2": get_testdata_file("MR_small.dcm"),
        "f6": get_testdata_file("MR_small_jpeg_ls_lossless.dcm"),
    }
    for dicom_id, source in sources.items():
        shutil.copy(source, study1 / f"{dicom_id}.dcm")
    png_or_jpeg(study2 / "c3.jpg")
    shutil.copy(get_testdata_file("MR_small.dcm"), study3 / "d4.dcm")
    png_or_jpeg(study3 / "d4.jpg")  # the same image as JPEG too: the DICOM is preferred
    shutil.copy(get_testdata_file("CT_small.dcm"), study4 / "e5.dcm")  # a study without a report
    (files / "p10" / "p10000032" / "s50414267.txt").write_text(REPORT_SECTIONS)
    (files / "p10" / "p10000032" / "s53189527.txt").write_text(REPORT_COMBINED)
    (files / "p11" / "p11000011" / "s55000001.txt").write_text(REPORT_PLAIN)
    (files / "p11" / "p11000011" / "s57000000.txt").write_text(REPORT_PLAIN)  # a report without images
    (root / "metadata.csv").write_text("dicom_id,subject_id,study_id,ViewPosition\n"
                                       "a1,10000032,50414267,PA\nb2,10000032,50414267,LATERAL\nc3,10000032,53189527,AP\n")
    (root / "chexpert.csv").write_text("subject_id,study_id,Cardiomegaly,Edema,No Finding,Pneumothorax\n"
                                       "10000032,50414267,,,1.0,\n10000032,53189527,1.0,-1.0,,0.0\n")
    return {"a1": study1 / "a1.dcm", "b2": study1 / "b2.dcm", "f6": study1 / "f6.dcm", "c3": study2 / "c3.jpg",
            "d4": study3 / "d4.dcm", "e5": study4 / "e5.dcm"}


def mimic_argv(root: Path) -> list[str]:
    return ["--root", str(root), "--metadata", str(root / "metadata.csv"), "--labels", str(root / "chexpert.csv")]


def test_mimic_rows_groups_labels_views_and_text(tmp_path):
    images = mimic_tree(tmp_path)
    rows = {row.metadata["dicom_id"]: row for row in rows_of(mimic_cxr, mimic_argv(tmp_path))}
    assert sorted(rows) == sorted(images)
    for dicom_id, row in rows.items():
        assert row.image == str(images[dicom_id])
        assert row.id == f"{row.group}_{row.metadata['study_id']}_{dicom_id}"
    assert {d: rows[d].group for d in rows} == {"a1": "p10000032", "b2": "p10000032", "f6": "p10000032",
                                                 "c3": "p10000032", "d4": "p11000011", "e5": "p11000011"}
    assert rows["a1"].text == ("FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                               "nodular opacities that most likely represent nipple shadows. The cardiomediastinal "
                               "silhouette is normal.\nIMPRESSION: No acute cardiopulmonary process.")
    assert rows["c3"].text == "FINDINGS AND IMPRESSION: No pneumothorax. Lines are unchanged."
    assert rows["d4"].text == "Portable chest radiograph. Lungs are clear." and rows["d4"].metadata["text_from"] == "whole_report"
    assert rows["e5"].text == ""  # no report: yielded so the writer records it
    assert rows["a1"].labels == ["No Finding"] and rows["c3"].labels == ["Cardiomegaly"] and rows["d4"].labels == []
    assert [rows[d].metadata["view"] for d in ("a1", "b2", "c3", "d4")] == ["PA", "LATERAL", "AP", ""]
    assert np.array_equal(read_dicom(rows["b2"].image).pixels, read_dicom(get_testdata_file("MR_small.dcm")).pixels)

    impression = rows_of(mimic_cxr, ["--root", str(tmp_path / "files"), "--sections", "impression"])
    assert {r.metadata["dicom_id"]: r.text for r in impression}["a1"] == "IMPRESSION: No acute cardiopulmonary process."


def test_mimic_input_errors(tmp_path):
    mimic_tree(tmp_path)
    with pytest.raises(InputError, match="missing_root"):
        rows_of(mimic_cxr, ["--root", str(tmp_path / "missing_root")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no studies found"):
        rows_of(mimic_cxr, ["--root", str(tmp_path / "empty")])
    (tmp_path / "bad_labels.csv").write_text("subject_id,study_id,Edema\n10000032,50414267,1.0\n1,2,maybe\n")
    with pytest.raises(InputError, match=r"bad_labels.csv:3: column 'Edema' holds 'maybe'"):
        rows_of(mimic_cxr, ["--root", str(tmp_path), "--labels", str(tmp_path / "bad_labels.csv")])
    (tmp_path / "bad_meta.csv").write_text("dicom_id,view\na1,PA\n")
    with pytest.raises(InputError, match=r"bad_meta.csv:1: missing column\(s\) ViewPosition"):
        rows_of(mimic_cxr, ["--root", str(tmp_path), "--metadata", str(tmp_path / "bad_meta.csv")])


def test_mimic_end_to_end_shards_keep_16bit(tmp_path):
    mimic_tree(tmp_path)
    out = tmp_path / "shards"
    code = shard_main(["mimic-cxr", *mimic_argv(tmp_path), "--out", str(out), "--keep-16bit", "--workers", "1",
                       "--no-progress"])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert index["errors"] == 1 == len(errors)
    assert errors[0]["id"].endswith("_e5") and errors[0]["reason"] == "empty report"
    samples = read_shards(out)
    assert len(samples) == 5  # f6, JPEG-LS lossless, decodes with the pinned plugins
    jpeg_ls = np.asarray(Image.open(io.BytesIO(samples["p10000032_s50414267_f6"]["png"])))
    assert np.array_equal(jpeg_ls, read_dicom(get_testdata_file("MR_small.dcm"), keep_16bit=True).pixels)
    mr = samples["p10000032_s50414267_b2"]
    stored = np.asarray(Image.open(io.BytesIO(mr["png"])))
    assert np.array_equal(stored, read_dicom(get_testdata_file("MR_small.dcm"), keep_16bit=True).pixels)
    meta = json.loads(mr["json"])
    assert meta["group"] == "p10000032" and meta["view"] == "LATERAL" and meta["labels"] == ["No Finding"]


# ---------------------------------------------------------------- ROCO


def roco_inputs(tmp_path: Path, captions: str, name: str = "captions.txt") -> list[str]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    png_or_jpeg(images / "ROCO_00001.jpg")
    png_or_jpeg(images / "ROCO_00002.png")
    (tmp_path / name).write_text(captions)
    return ["--images", str(images), "--captions", str(tmp_path / name)]


def test_roco_captions_txt_rows(tmp_path):
    argv = roco_inputs(tmp_path, "ROCO_00001\t Computed tomography of the chest  showing a mass.\n\n"
                                 "ROCO_00002\t X-ray of the left hand.\nROCO_00003\t Missing image.\n")
    rows = rows_of(roco, argv)
    images = tmp_path / "images"
    assert [(r.id, r.image, r.text, r.group) for r in rows] == [
        ("ROCO_00001", str(images / "ROCO_00001.jpg"), "Computed tomography of the chest showing a mass.", "ROCO_00001"),
        ("ROCO_00002", str(images / "ROCO_00002.png"), "X-ray of the left hand.", "ROCO_00002"),
        ("ROCO_00003", str(images / "ROCO_00003.jpg"), "Missing image.", "ROCO_00003"),
    ]
    assert rows[2].metadata["orig_captions"].endswith("captions.txt:4")


def test_roco_csv_and_jsonl(tmp_path):
    csv_rows = rows_of(roco, roco_inputs(tmp_path, 'ID,Caption\nROCO_00001,"CT, axial view."\nROCO_00002,Hand.\n',
                                         "captions.csv"))
    assert [(r.id, r.text) for r in csv_rows] == [("ROCO_00001", "CT, axial view."), ("ROCO_00002", "Hand.")]
    jsonl_rows = rows_of(roco, roco_inputs(tmp_path, '{"id": "ROCO_00002", "caption": "Hand."}\n', "captions.jsonl"))
    assert [(r.id, r.text) for r in jsonl_rows] == [("ROCO_00002", "Hand.")]


@pytest.mark.parametrize("name,text,needle", [
    ("captions.txt", "ROCO_00001\tA caption.\nROCO_00002 no tab here\n", r"captions.txt:2: expected '<id><TAB>"),
    ("captions.txt", "ROCO_00001\tA.\nROCO_00001\tB.\n", r"captions.txt:2: duplicate id 'ROCO_00001' \(first on line 1\)"),
    ("captions.txt", "../etc\tA.\n", r"captions.txt:1: invalid id"),
    ("captions.csv", "name,label\nROCO_00001,x\n", r"captions.csv:1: needs an id column"),
    ("captions.jsonl", '{"id": "ROCO_00001", "caption": "A."}\n{"id": \n', r"captions.jsonl:2: not valid JSON"),
])
def test_roco_malformed_input_names_file_and_line(tmp_path, name, text, needle):
    with pytest.raises(InputError, match=needle):
        rows_of(roco, roco_inputs(tmp_path, text, name))


def test_roco_missing_paths(tmp_path):
    argv = roco_inputs(tmp_path, "ROCO_00001\tA.\n")
    with pytest.raises(InputError, match="nope.txt"):
        rows_of(roco, [argv[0], argv[1], "--captions", str(tmp_path / "nope.txt")])
    with pytest.raises(InputError, match="no_images"):
        rows_of(roco, ["--images", str(tmp_path / "no_images"), argv[2], argv[3]])


def test_roco_end_to_end_shards(tmp_path):
    argv = roco_inputs(tmp_path, "ROCO_00001\t CT of the chest.\nROCO_00002\t X-ray of the hand.\nROCO_00003\t Gone.\n")
    out = tmp_path / "shards"
    assert shard_main(["roco", *argv, "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["errors"] == 1
    samples = read_shards(out)
    assert {k: v["txt"].decode() for k, v in samples.items()} == {"ROCO_00001": "CT of the chest.",
                                                                   "ROCO_00002": "X-ray of the hand."}
    assert shard_main(["roco", argv[0], argv[1], "--captions", str(tmp_path / "nope.txt"), "--out",
                       str(tmp_path / "x"), "--no-progress"]) == 2


# ---------------------------------------------------------------- report text helpers


def test_report_text_cleanup_rules(iu_rows):
    from unimlip_train.format.report_text import clean_report, select_sections, split_sections

    assert [r.text for r in iu_rows if r.group == "1"][0].endswith("Normal chest x-ray.")  # real "x-XXXX."
    assert clean_report("Comparison XXXX, XXXX. XXXX right pleural effusion. XXXX.") == "Comparison. Right pleural effusion."
    assert clean_report("Dual-XXXX pacer (XXXX).  Dr. ___ was called.") == "Dual pacer. Dr. was called."
    assert clean_report("Heart XXXX normal.", placeholder="[x]") == "Heart [x] normal."
    sections = split_sections(REPORT_SECTIONS)
    assert list(sections) == ["", "examination", "indication", "comparison", "findings", "impression"]
    assert select_sections(sections, ["impression", "findings"]).startswith("No acute cardiopulmonary process. There")
    assert select_sections(sections, ["conclusion"]) == ""


def test_mimic_group_views_study(tmp_path):
    images = mimic_tree(tmp_path)
    rows = {r.id: r for r in rows_of(mimic_cxr, mimic_argv(tmp_path) + ["--group-views", "study", "--max-views", "2"])}
    study1 = rows["p10000032_s50414267"]
    # PA (a1) before LATERAL (b2) from the metadata CSV; f6 has no view in the CSV: after them, and over --max-views
    assert [(v.name, v.position, v.path) for v in study1.views] == [("a1", "PA", str(images["a1"])),
                                                                    ("b2", "LATERAL", str(images["b2"]))]
    assert study1.metadata["views_in_study"] == 3 and study1.metadata["views_kept"] == 2
    assert study1.text.endswith("IMPRESSION: No acute cardiopulmonary process.") and study1.labels == ["No Finding"]
    assert len(rows) == 4 and all(r.group.startswith("p1") for r in rows.values())
    out = tmp_path / "shards"
    assert shard_main(["mimic-cxr", *mimic_argv(tmp_path), "--group-views", "study", "--max-views", "2", "--out", str(out),
                       "--val-fraction", "0", "--workers", "2", "--no-progress"]) == 0
    samples = read_shards(out)
    meta = json.loads(samples["p10000032_s50414267"]["json"])
    assert [(v["member"], v["view"], v["name"]) for v in meta["views"]] == [("jpg", "PA", "a1"),
                                                                        ("view1.jpg", "LATERAL", "b2")]
    for v in meta["views"]:  # each member holds the image its entry names (sources differ: CT vs MR)
        stored = np.asarray(Image.open(io.BytesIO(samples["p10000032_s50414267"][v["member"]])))
        assert stored.shape == read_dicom(v["orig_path"]).pixels.shape
    rtg = tmp_path / "rtg"  # a DICOM's own ViewPosition fills a view the CSV does not give
    (rtg / "files" / "p12" / "p12000001" / "s58000000").mkdir(parents=True)
    shutil.copy(get_testdata_file("RG3_UNCR.dcm"), rtg / "files" / "p12" / "p12000001" / "s58000000" / "g7.dcm")
    (rtg / "files" / "p12" / "p12000001" / "s58000000.txt").write_text(REPORT_PLAIN)
    assert shard_main(["mimic-cxr", "--root", str(rtg), "--group-views", "study", "--out", str(rtg / "out"),
                       "--val-fraction", "0", "--max-size", "64", "--workers", "1", "--no-progress"]) == 0
    meta = json.loads(read_shards(rtg / "out")["p12000001_s58000000"]["json"])
    assert meta["view"] == "AP" and meta["views"][0]["view"] == "AP"
