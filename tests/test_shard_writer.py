"""The shard writer end to end through ``unimlip-shard``: real images, real tars, real processes."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main

REPO = Path(__file__).resolve().parent.parent


def _write_dataset(root: Path, n_rows: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Real PNG/JPEG files (gray, RGB, 16-bit, sizes around --max-size) and a CSV manifest over them."""
    rng = np.random.default_rng(seed)
    img_dir = root / "imgs"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(n_rows):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        kind = i % 4
        if kind == 0:
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(img_dir / name)
        elif kind == 1:
            name = f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name, quality=90)
        elif kind == 2:
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(img_dir / name)
        else:  # large enough for reduced-scale JPEG decoding at --max-size 48
            name = f"sub/img{i}.jpeg"
            (img_dir / "sub").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (4 * h, 4 * w), dtype=np.uint8)).save(img_dir / name, quality=90)
        rows.append({"id": f"study.{i}/img", "image": name, "text": f"Report {i}: lungs, clear. \"quoted\"\nline 2",
                     "group": f"patient{i // 3}", "labels": "Opacity|Cardiomegaly" if i % 5 == 0 else "",
                     "view": "PA" if i % 2 else "AP", "age": str(20 + i % 50)})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest, rows


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Naive reader: group members by the part of the name before the first dot."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return dict(samples)


def _shard_args(manifest: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["manifest", "--manifest", str(manifest), "--images-root", str(images), "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    manifest, rows = _write_dataset(root, 150)
    return root, manifest, rows


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory):
    root, manifest, rows = dataset
    out = tmp_path_factory.mktemp("out1")
    args = _shard_args(manifest, root / "imgs", out, "--workers", "1", "--shard-size", "16", "--max-size", "48",
                       "--val-fraction", "0.2", "--test-fraction", "0.1", "--seed", "7")
    assert main(args) == 0
    return out, args


def test_round_trip_counts_keys_hashes_and_metadata(dataset, sharded):
    root, manifest, rows = dataset
    out, _ = sharded
    index = json.loads((out / "index.json").read_text())
    assert index["errors"] == 0 and (out / "errors.jsonl").read_text() == ""
    assert set(index["splits"]) == {"train", "val", "test"}
    by_id = {r["id"]: r for r in rows}
    seen_ids, group_split = set(), {}
    for split, info in index["splits"].items():
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        for i, shard in enumerate(info["shards"]):
            path = out / shard["name"]
            assert shard["name"] == f"{split}-{i:06d}.tar"
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            samples = _read_tar(path)
            assert len(samples) == shard["samples"] <= 16
            for key, sample in samples.items():
                assert "." not in key and "/" not in key
                meta = json.loads(sample["json"])
                src = by_id[meta["id"]]
                assert meta["id"] not in seen_ids
                seen_ids.add(meta["id"])
                assert sample["txt"].decode() == src["text"].strip()
                assert meta["group"] == src["group"] and meta["view"] == src["view"] and meta["age"] == src["age"]
                assert meta["labels"] == ([l for l in src["labels"].split("|")] if src["labels"] else [])
                assert meta["orig_path"] == src["image"] and meta["source"] == "manifest" and meta["split"] == split
                with Image.open(root / "imgs" / src["image"]) as im:
                    assert meta["orig_size"] == list(im.size)
                    orig_w, orig_h = im.size
                ext = "jpg" if "jpg" in sample else "png"
                assert set(sample) == {ext, "json", "txt"}
                with Image.open(io.BytesIO(sample[ext])) as im:
                    assert im.format == ("JPEG" if ext == "jpg" else "PNG")
                    assert max(im.size) == min(48, max(orig_w, orig_h))
                assert group_split.setdefault(meta["group"], split) == split  # no patient in two splits
    assert seen_ids == set(by_id)
    assert index["samples"] == len(rows)
    assert index["tool"]["name"] == "unimlip-shard" and index["tool"]["args"]["seed"] == 7


def test_same_seed_same_bytes_for_any_worker_count(dataset, sharded, tmp_path):
    root, manifest, _ = dataset
    out1, args = sharded
    out2 = tmp_path / "out2"
    args2 = [a if a != str(out1) else str(out2) for a in args]
    args2[args2.index("--workers") + 1] = "2"
    assert main(args2) == 0
    assert (out1 / "index.json").read_text() == (out2 / "index.json").read_text()
    for path in out1.glob("*.tar"):
        assert path.read_bytes() == (out2 / path.name).read_bytes()
    out3 = tmp_path / "out3"
    args3 = [a if a != str(out1) else str(out3) for a in args]
    args3[args3.index("--seed") + 1] = "8"
    assert main(args3) == 0
    split_of = lambda out: {m: s for s, i in json.loads((out / "index.json").read_text())["splits"].items()
                            for sh in i["shards"] for m in _read_tar(out / sh["name"])}
    assert split_of(out1) != split_of(out3)  # the seed drives the split


def test_byte_bound_and_16bit(dataset, tmp_path):
    root, manifest, rows = dataset
    out = tmp_path / "bytes"
    bound = 64 * 1024
    assert main(_shard_args(manifest, root / "imgs", out, "--workers", "1", "--shard-bytes", str(bound),
                            "--val-fraction", "0", "--keep-16bit", "--max-size", "128", "--window", "none")) == 0
    index = json.loads((out / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["bytes"] <= bound or s["samples"] == 1 for s in shards)
    assert sum(s["samples"] for s in shards) == len(rows) and any(s["samples"] > 1 for s in shards)
    sixteen = {f"study.{i}/img" for i in range(len(rows)) if i % 4 == 2}
    found = 0
    for s in shards:
        for key, sample in _read_tar(out / s["name"]).items():
            meta = json.loads(sample["json"])
            if meta["id"] in sixteen:
                found += 1
                arr = np.asarray(Image.open(io.BytesIO(sample["png"])))
                assert arr.dtype == np.uint16 and "jpg" not in sample
                src = np.asarray(Image.open(root / "imgs" / meta["orig_path"]))
                assert arr.shape == src.shape and np.array_equal(arr, src)  # no resize needed: lossless
            else:
                assert "jpg" in sample
    assert found == len(sixteen)


def test_bad_rows_are_skipped_counted_and_logged(tmp_path):
    img = tmp_path / "ok.png"
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(img)
    good = img.read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notimage.jpg").write_bytes(b"this is not a jpeg")
    records = [{"id": "a", "image": "ok.png", "text": "fine"}, {"id": "b", "image": "trunc.png", "text": "x"},
               {"id": "c", "image": "missing.png", "text": "x"}, {"id": "d", "image": "ok.png", "text": "   "},
               {"id": "e", "image": "notimage.jpg", "text": "x"}, {"id": "f", "image": "ok.png", "text": "also fine"},
               {"id": "a", "image": "ok.png", "text": "duplicate id"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert main(["manifest", "--manifest", str(manifest), "--out", str(out), "--workers", "1", "--no-progress",
                 "--val-fraction", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 2 and index["errors"] == 5
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = {(e["id"], e["reason"].split(":")[0]) for e in errors}
    assert {e["id"] for e in errors} == {"b", "c", "d", "e", "a"}
    assert ("d", "empty report") in reasons and ("c", "image not found") in reasons
    assert ("b", "undecodable image") in reasons and ("e", "undecodable image") in reasons
    assert ("a", "duplicate id") in reasons
    assert main(["verify", str(out), "--decode", "--no-progress"]) == 0


@pytest.mark.parametrize("content,suffix,needle", [
    ('{"image": "a.png", "text": "t"}\n{"image": "b.png", "text": \n', ".jsonl", ":2: invalid JSON"),
    ('{"image": "a.png", "text": "t"}\n["not", "an", "object"]\n', ".jsonl", ":2: expected a JSON object"),
    ('{"image": "a.png", "text": "t"}\n\n{"image": "b.png"}\n', ".jsonl", ":3: missing required field(s) text"),
    ("image,report\na.png,hello\n", ".csv", ":1: missing required column(s) text"),
    ("image,text\na.png,hello\nb.png,hi,extra\n", ".csv", ":3: expected 2 fields, got 3"),
    ('image,text\na.png,"unterminated\n', ".csv", "malformed CSV"),
    ("image,text\n", ".xlsx", "unknown manifest type"),
])
def test_unusable_manifest_exits_2_naming_file_and_line(tmp_path, capsys, content, suffix, needle):
    manifest = tmp_path / f"bad{suffix}"
    manifest.write_text(content)
    assert main(["manifest", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and needle in err
    assert not (tmp_path / "o" / "index.json").exists()


def test_missing_input_paths_exit_2(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\na.png,hi\n")
    assert main(["manifest", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["manifest", "--manifest", str(manifest), "--images-root", str(tmp_path / "noroot"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "noroot" in capsys.readouterr().err
    assert main(["manifest", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no usable rows" in capsys.readouterr().err  # a.png does not exist: every row skipped
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert main(["manifest", "--manifest", str(manifest)]) == 2  # argparse usage error: --out missing


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", *args]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    big = np.random.default_rng(1).integers(0, 256, (700, 900), dtype=np.uint8)
    Image.fromarray(big).save(root / "big.png", compress_level=0)  # slow enough to decode and resize
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "text", "group"])
        w.writerows([f"r{i:04d}", "big.png", f"report {i}", f"g{i // 2}"] for i in range(160))
    common = ["manifest", "--manifest", str(root / "m.csv"), "--shard-size", "6", "--max-size", "64",
              "--workers", "1", "--no-progress"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(_cli(*common, "--out", str(killed)), start_new_session=True, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(killed.glob("train-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "index.json").exists()  # really interrupted mid-run
    finished_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.glob("*.tar")}

    assert subprocess.run(_cli(*common, "--out", str(killed)), cwd=REPO, timeout=300).returncode == 0
    assert subprocess.run(_cli(*common, "--out", str(reference), "--workers", "2"), cwd=REPO,
                          timeout=300).returncode == 0
    assert (killed / "index.json").read_text() == (reference / "index.json").read_text()
    assert not list(killed.glob("*.tmp"))
    # Shards finished before the kill were kept, not rewritten (a rewrite renames a new file into place).
    assert all(((killed / name).stat().st_ino, (killed / name).stat().st_mtime_ns) == kept
               for name, kept in finished_before.items())
    assert subprocess.run(_cli("verify", str(killed), "--no-progress"), cwd=REPO, timeout=120).returncode == 0


def test_verify_detects_tampering_and_duplicate_keys(sharded, tmp_path, capsys):
    out, _ = sharded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["verify", str(copy), "--no-progress"]) == 0
    index = json.loads((copy / "index.json").read_text())
    first = index["splits"]["train"]["shards"][0]
    data = bytearray((copy / first["name"]).read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload
    (copy / first["name"]).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(copy), "--no-progress"]) == 1
    assert "sha256 does not match" in capsys.readouterr().out

    dup = tmp_path / "dup"
    shutil.copytree(out, dup)
    index = json.loads((dup / "index.json").read_text())
    train = index["splits"]["train"]
    src = dup / train["shards"][0]["name"]
    extra = f"train-{len(train['shards']):06d}.tar"
    shutil.copy(src, dup / extra)
    train["shards"].append(dict(train["shards"][0], name=extra))
    train["samples"] += train["shards"][0]["samples"]
    (dup / "index.json").write_text(json.dumps(index))
    assert main(["verify", str(dup), "--no-progress"]) == 1
    assert "duplicate key" in capsys.readouterr().out


def test_dicom_rows_by_suffix_or_magic_16bit_or_8bit(tmp_path):
    import pydicom.data

    from data_prep.dicom import read_dicom

    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    shutil.copy(ct, tmp_path / "ct.dcm")
    shutil.copy(ct, tmp_path / "ct_no_suffix")  # recognised by b"DICM" at offset 128
    (tmp_path / "broken.dcm").write_bytes(ct.read_bytes()[:400])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": n, "image": n, "text": f"CT {n}"}) + "\n"
                                for n in ("ct.dcm", "ct_no_suffix", "broken.dcm")))
    expected16 = read_dicom(str(ct), keep_16bit=True).pixels
    for keep, ext in (("--keep-16bit", "png"), (None, "jpg")):
        out = tmp_path / f"out_{ext}"
        args = ["manifest", "--manifest", str(manifest), "--out", str(out), "--workers", "1", "--val-fraction", "0",
                "--no-progress"] + ([keep] if keep else [])
        assert main(args) == 0
        index = json.loads((out / "index.json").read_text())
        assert index["samples"] == 2 and index["errors"] == 1
        (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        assert error["id"] == "broken.dcm" and "DICOM" in error["reason"]
        samples = _read_tar(out / index["splits"]["train"]["shards"][0]["name"])
        assert len(samples) == 2
        for sample in samples.values():
            assert set(sample) == {ext, "json", "txt"}
            arr = np.asarray(Image.open(io.BytesIO(sample[ext])))
            assert json.loads(sample["json"])["orig_size"] == [expected16.shape[1], expected16.shape[0]]
            if ext == "png":
                assert arr.dtype == np.uint16 and np.array_equal(arr, expected16)
            else:
                assert arr.dtype == np.uint8 and arr.shape == expected16.shape


def test_rerun_with_other_options_refuses_to_replace_shards_unless_asked(dataset, tmp_path, capsys):
    root, manifest, _ = dataset
    out = tmp_path / "out"
    first = _shard_args(manifest, root / "imgs", out, "--workers", "1", "--shard-size", "40", "--max-size", "32")
    assert main(first) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert main(first) == 0  # the same inputs and options: a rerun just finishes (nothing is missing)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    other = [*first, "--seed", "3"]
    capsys.readouterr()
    assert main(other) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before  # nothing deleted
    assert main([*other, "--overwrite"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["tool"]["args"]["seed"] == 3 and "overwrite" not in index["tool"]["args"]
    foreign = tmp_path / "foreign"  # shards from another tool (no journal of ours) are refused too
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"not ours")
    assert main(_shard_args(manifest, root / "imgs", foreign, "--workers", "1")) == 2
    assert (foreign / "train-000000.tar").read_bytes() == b"not ours"


def test_sha256_covers_whole_shards_beyond_the_first_mib(tmp_path, capsys):
    """Real shards reach 1 GB: the recorded sha256 is over every byte, and a flip past the first MiB is caught."""
    rng = np.random.default_rng(5)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(8):  # incompressible 512 x 512 noise: ~0.2 MB per JPEG, ~1.7 MB in one shard
        Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(tmp_path / "imgs" / f"n{i}.png")
        rows.append({"id": f"n{i}", "image": f"n{i}.png", "text": f"report {i}", "group": f"p{i}"})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert main(_shard_args(tmp_path / "m.csv", tmp_path / "imgs", out, "--val-fraction", "0", "--workers", "1")) == 0
    (shard,) = json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]
    path = out / shard["name"]
    assert path.stat().st_size > (3 << 19)  # well past 1 MiB
    assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[len(data) - 5000] ^= 0xFF  # inside the last member's image payload, far past the first MiB
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out), "--no-progress"]) == 1
    assert "sha256 does not match" in capsys.readouterr().out


def test_disk_full_one_message_no_leftovers_and_the_rerun_finishes(tmp_path):
    """A real full file system: a small tmpfs in a private mount namespace (needs unshare and mount)."""
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare to mount a small tmpfs")
    cmd = [sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "120", "--image-size", "64", "--workers", "1",
           "--shard-size", "20", "--no-progress"]
    reference = tmp_path / "reference"
    subprocess.run(cmd + ["--out", str(reference)], check=True, capture_output=True, timeout=120)
    disk, result = tmp_path / "disk", tmp_path / "result"
    disk.mkdir()
    script = f"""
set -u
mount -t tmpfs -o size=900k tmpfs {disk} || exit 77
{' '.join(cmd)} --out {disk}/out > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
ls -A {disk}/out > {tmp_path}/left.txt
mount -o remount,size=20m {disk}
{' '.join(cmd)} --out {disk}/out > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
cp -r {disk}/out {result}
"""
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if run.returncode == 77 or "unshare" in run.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1"
    errors = [line for line in first_err.splitlines() if line.startswith("unimlip-shard: error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and "free" in errors[0]
    assert "Traceback" not in first_err
    left = (tmp_path / "left.txt").read_text().split()
    assert not [n for n in left if n.endswith(".tmp") or n == ".synthetic-src"], left
    assert any(n.endswith(".tar") for n in left)  # finished shards were kept for the rerun
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    ours, theirs = (json.loads((d / "index.json").read_text()) for d in (result, reference))
    assert ours["splits"] == theirs["splits"]  # the same shards, byte for byte (sha256 in the index)
