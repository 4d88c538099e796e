"""Hostile and damaged shard content: no tool fails with a traceback, every problem names its shard and sample,
json is parsed within limits, and a decompression bomb is refused from its header, before it costs memory."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from damaged_shards import bomb_png, real_shards, rewrite_shard
from data_prep.cli import main as shard_main
from unimlip_train.config.schema import Config
from unimlip_train.data.collate import BatchNeeds
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.format.limits import MAX_JSON_DEPTH, ContentError, json_depth, parse_json_member

REPO = Path(__file__).resolve().parent.parent
DEEP = b"[" * 100_000 + b"]" * 100_000


def _depth(value) -> int:
    """Nesting depth the naive way: recursion over the parsed value."""
    if isinstance(value, (list, dict)):
        return 1 + max((_depth(v) for v in (value.values() if isinstance(value, dict) else value)), default=0)
    return 0


def test_json_members_are_parsed_within_limits():
    for text in ('{"a": [1, {"b": "[[[{{{"}], "c": {}}', '[]', '"x"', '{"v": [[[[[["\\"["]]]]]]}', '7'):
        assert json_depth(text.encode()) == _depth(json.loads(text)), text
        assert parse_json_member(text.encode()) == json.loads(text)
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json_member(nested) is not None
    with pytest.raises(RecursionError):
        json.loads(DEEP)  # what the verify of the issue met
    for bad, why in ((DEEP, "nested 100000 levels"), (b"[" + nested + b"]", f"nested {MAX_JSON_DEPTH + 1} levels"),
                     (b" " * (2 << 20), "bytes, above the limit"), (b"", "not valid JSON"),
                     (b"\xff{}", "not UTF-8"), (b"1" * 5000, "not valid JSON")):
        with pytest.raises(ContentError, match=why):
            parse_json_member(bad)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """Real shards; in train-000000.tar one sample's json nested 100,000 deep, one empty, one image a bomb."""
    shards = real_shards(tmp_path_factory.mktemp("hostile"), per_class=10, shard_size=10)

    def edit(samples):
        (k0, m0), (k1, m1), (k2, m2) = samples[:3]
        m0["json"], m1["json"] = DEEP, b""
        del m2["jpg"]
        m2["png"] = bomb_png()
        return samples

    rewrite_shard(shards, "train-000000.tar", edit)
    return shards


def _keys(shards: Path, n: int = 3) -> list[str]:
    from data_prep.verify import iter_samples

    return [key for key, _ in iter_samples(shards / "train-000000.tar")][:n]


def test_verify_and_audit_name_shard_and_sample(hostile, tmp_path):
    deep, empty, bomb = _keys(hostile)
    run = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(hostile), "--decode", "--no-progress"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr
    *problems, last = run.stdout.strip().splitlines()
    assert json.loads(last) == {"bad_samples": 3, "bad_by_shard": {"train-000000.tar": 3}, "shards": 4,
                                "samples": 40, "samples_read": 40, "problems": 3, "decoded": True}
    assert [p.split(": ")[:2] for p in problems] == [["train-000000.tar", k] for k in (deep, empty, bomb)]
    assert "nested 100000 levels deep" in problems[0] and "not valid JSON" in problems[1]
    assert "13000 x 13000 = 169.0 megapixels, above --max-pixels=40000000" in problems[2]

    audited = subprocess.run([sys.executable, "-m", "data_prep.cli", "audit", str(hostile), "--no-progress"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert audited.returncode == 0 and "Traceback" not in audited.stdout + audited.stderr
    named = audited.stderr.strip().splitlines()
    assert [p.split(": ")[:2] for p in named] == [["train-000000.tar", deep], ["train-000000.tar", empty]]
    summary = json.loads(audited.stdout.strip().splitlines()[-1])
    assert summary["not_audited"] == 2 and summary["samples"] == 38
    gate = subprocess.run([sys.executable, "-m", "data_prep.cli", "audit", str(hostile), "--fail-on-leak",
                           "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert gate.returncode == 1  # a gate does not pass data it could not read

    # Nothing is a shard: a tar of noise, a listed name that climbs out, neither a traceback.
    broken = tmp_path / "broken"
    shutil.copytree(hostile, broken)
    (broken / "train-000001.tar").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    index = json.loads((broken / "index.json").read_text())
    index["splits"]["train"]["shards"][2]["name"] = "../hostile/train-000002.tar"
    (broken / "index.json").write_text(json.dumps(index))
    run = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(broken), "--no-progress"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr
    assert "train-000001.tar: unreadable tar before any sample" in run.stdout
    assert "../hostile/train-000002.tar: not a shard name" in run.stdout
    assert json.loads(run.stdout.strip().splitlines()[-1])["bad_by_shard"]["train-000001.tar"] == 10


def test_training_skips_hostile_samples_with_their_reasons(hostile, caplog):
    cfg = Config()
    cfg.data.train, cfg.data.image_size, cfg.data.num_workers, cfg.data.shuffle_buffer = str(hostile), 32, 0, 0
    cfg.data.text.max_length = 32
    cfg.train.micro_batch_size = 4
    stream = TrainStream(cfg, load_tokenizer(""), BatchNeeds(), 0, 1)
    with caplog.at_level(logging.WARNING, logger="unimlip_train.data.skips"):
        for n, _ in enumerate(stream, start=1):
            if n == stream.steps_per_epoch:
                break
    stats = stream.skip_stats()
    # One epoch is 40 samples; the 3 lost are made up from the next pass, which may meet them once more.
    assert set(stats.by_shard) == {str(hostile / "train-000000.tar")} and stats.skipped in (3, 6)
    assert stats.read == 40 + stats.skipped
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    for key, why in zip(_keys(hostile), ("nested 100000 levels deep", "not valid JSON",
                                         "169.0 megapixels, above data.max_image_pixels=40000000")):
        assert f"skipping corrupt sample {key} of {hostile / 'train-000000.tar'}: ContentError: " in reasons
        assert why in reasons


_PEAK = """
import sys
from unimlip_train.data.transforms import decode_image

def hwm():  # this process's peak RSS in KiB (VmHWM starts again at exec; ru_maxrss keeps a forking parent's)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

data = open(sys.argv[1], "rb").read()
before = hwm()
try:
    decode_image(data, 1, 64, int(sys.argv[2]))
    outcome = "decoded"
except ValueError as e:
    outcome = str(e)
after = hwm()
print((after - before) // 1024, after // 1024, outcome)
"""


def test_a_decompression_bomb_is_refused_before_it_costs_memory(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    assert bomb.stat().st_size < 200_000

    def peak(limit: int) -> tuple[int, int, str]:
        """(MiB the decode call added to the process's peak, the process's peak in MiB, the outcome)."""
        out = subprocess.run([sys.executable, "-c", _PEAK, str(bomb), str(limit)], capture_output=True, text=True,
                             cwd=REPO, timeout=300, check=True).stdout.split(" ", 2)
        return int(out[0]), int(out[1]), out[2].strip()

    refused_added, refused_peak, why = peak(40_000_000)
    _, decoded_peak, outcome = peak(0)  # the limit off: the same bytes really are a bomb
    assert why.startswith("image of 13000 x 13000 = 169.0 megapixels, above data.max_image_pixels=40000000")
    # Peaks of two processes that imported the same code: the decoded one held the 169-megapixel image, the
    # refused call added nothing.
    assert outcome == "decoded" and decoded_peak - refused_peak >= 150 and refused_added < 10

    # Sharding: the bomb's row is skipped with its reason, the real images are sharded.
    rows = [{"image": "bomb.png", "text": "FINDINGS: none. IMPRESSION: bomb."}]
    for i in range(3):
        from PIL import Image

        Image.new("L", (40, 40), 30 * i).save(tmp_path / f"r{i}.png")
        rows.append({"image": f"r{i}.png", "text": f"FINDINGS: image {i}. IMPRESSION: clear."})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert shard_main(["manifest", "--manifest", str(manifest), "--out", str(out), "--val-fraction", "0",
                       "--workers", "1", "--no-progress", "--no-audit"]) == 0
    (error,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert error["image"].endswith("bomb.png") and "13000 x 13000" in error["reason"]
    assert "above --max-pixels=40000000 (refused before decoding)" in error["reason"]
    assert json.loads((out / "index.json").read_text())["samples"] == 3
