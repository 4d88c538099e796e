"""``unimlip-shard audit`` and the writer's within-set audit on real images (PneumoniaMNIST, which holds exact
duplicates of its own), against naive references computed here from the source arrays."""
from __future__ import annotations

import json
import os
from collections import Counter

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import PNEUMONIAMNIST_NPZ
from data_prep.cli import main


@pytest.fixture(scope="module")
def xrays():
    """The test subset's real X-rays; PneumoniaMNIST itself repeats a few train images, the subset does not,
    so three byte-identical copies are planted among the train images."""
    data = np.load(PNEUMONIAMNIST_NPZ)
    train = data["train_images"]
    return np.concatenate([train, train[[11, 200, 317]]]), data["val_images"][:60]


def shard(tmp, name, images, texts, groups, *extra):
    folder = tmp / f"{name}_src"
    folder.mkdir()
    lines = ["id,image,text,group"]
    for i, (image, text, group) in enumerate(zip(images, texts, groups)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(f"{name}{i},{i}.png,{text},{group}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp / name
    assert main(["manifest", "--manifest", str(folder / "m.csv"), "--out", str(out), "--workers", "2",
                 "--no-progress", *extra]) == 0
    return out


def audit_json(capsys, *argv) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["audit", *map(str, argv), "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]), "\n".join(out[:-1])


def test_audit_within_and_against_an_evaluation_set(tmp_path, xrays, capsys):
    train, val = xrays
    exact = Counter(image.tobytes() for image in train)  # naive reference: byte-identical source images
    duplicated = sum(1 for n in exact.values() if n > 1)
    assert duplicated >= 1  # the data set's own duplicates

    n = len(train)
    pre = shard(tmp_path, "pre", train, [f"case {i} report" for i in range(n)], [f"p{i}" for i in range(n)],
                "--val-fraction", "0")
    index = json.loads((pre / "index.json").read_text())
    assert index["audit"]["identical_images"] == duplicated and index["audit"]["leaks"] == 0

    # An evaluation set: real val images plus planted leaks of each kind.
    resized = cv2.resize(train[7], (40, 40), interpolation=cv2.INTER_CUBIC)  # a resized, re-encoded copy
    images = list(val) + [train[5], resized, val[0] // 2 + 64]
    texts = [f"val {i}" for i in range(len(val))] + ["copy", "resized copy", "case 9 report"]
    groups = [f"v{i}" for i in range(len(val))] + ["v-a", "v-b", "p11"]
    evaluation = shard(tmp_path, "eval", images, texts, groups, "--val-fraction", "0")

    code, summary, table = audit_json(capsys, pre, "--against", evaluation, "--fail-on-leak", "--out",
                                      tmp_path / "all.jsonl")
    assert code == 1 and "identical_images" in table
    cross = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    leaks = {(f["kind"], frozenset(s["key"] for s in f["samples"])) for f in cross if f["leak"]}
    assert ("identical_images", frozenset({"pre5", "eval60"})) in leaks
    assert any(kind == "near_duplicate_images" and {"pre7", "eval61"} <= keys for kind, keys in leaks)
    assert ("identical_reports", frozenset({"pre9", "eval62"})) in leaks
    assert ("shared_groups", frozenset({"pre11", "eval62"})) in leaks
    # PneumoniaMNIST's own val split repeats some of its train images: naive count over the source arrays
    in_train = set(exact)
    real = {image.tobytes() for image in val if image.tobytes() in in_train}
    assert summary["leaks_by_kind"]["identical_images"] == 1 + len(real)
    assert summary["leaks_by_kind"]["identical_reports"] == summary["leaks_by_kind"]["shared_groups"] == 1
    assert summary["leaks"] == len(leaks) and summary["identical_images"] == duplicated + 1 + len(real)
    assert all(f["scope"] == "cross-set" for f in cross if f["leak"])
    assert summary["examples"]["identical_reports"][0]["count"] == 2

    code, again, _ = audit_json(capsys, pre, evaluation)  # no --fail-on-leak: exit 0 whatever it finds
    assert code == 0 and again["leaks"] == summary["leaks"]


def test_shards_without_stored_hashes_are_hashed_on_the_fly(tmp_path, xrays, capsys):
    """Another tool's shards (no hashes in their json) give the same findings as ours."""
    train, _ = xrays
    ours = shard(tmp_path, "ours", train[:40], [f"r{i}" for i in range(40)], [f"g{i}" for i in range(40)],
                 "--val-fraction", "0")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    counts = []
    with wds.ShardWriter(str(foreign / "train-%06d.tar"), maxcount=25, verbose=0) as sink:
        for name in sorted(os.listdir(ours)):
            if name.endswith(".tar"):
                for sample in wds.WebDataset(str(ours / name), shardshuffle=False, empty_check=False):
                    meta = json.loads(sample["json"])
                    plain = {k: v for k, v in meta.items() if k not in ("pixel_sha256", "phash", "report_hash")}
                    sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"],
                                "json": json.dumps(plain).encode()})
                    counts.append(1)
    shards = sorted(n for n in os.listdir(foreign) if n.endswith(".tar"))
    (foreign / "index.json").write_text(json.dumps({"splits": {"train": {"shards": [
        {"name": n, "samples": min(25, len(counts) - 25 * i)} for i, n in enumerate(shards)]}}}))
    code, summary, _ = audit_json(capsys, ours, "--against", foreign)
    assert code == 0
    assert summary["identical_images"] == summary["leaks_by_kind"]["identical_images"] == 40  # every image, once each
    assert summary["identical_reports"] == 40 and summary["shared_groups"] == 40 and summary["leaks"] == 120


def test_audit_errors_are_one_line(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "not a readable shard index" in capsys.readouterr().err
