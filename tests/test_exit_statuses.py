"""Every exit status in docs/exit-statuses.md, produced: config errors before anything starts (and before the run
dir exists), SIGTERM while sharding (one line, no traceback, and the rerun finishes byte for byte), the other
commands' statuses; and the table names only tests that exist, agreeing with what this file checks."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damaged_shards import naive_read

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
DOC = REPO / "docs" / "exit-statuses.md"
ROW = re.compile(r"^\| `(unimlip-[a-z-]+)` \| (\d+) \| .* \| (.+) \|$")
HERE = "tests/test_exit_statuses.py::"
#: The (command, status) pairs this file produces, by test: the table must say so, and only these.
CHECKED = {
    "test_train_config_errors_exit_2_before_anything_starts": {("unimlip-train", 0), ("unimlip-train", 2)},
    "test_shard_statuses_and_sigterm": {("unimlip-shard", 0), ("unimlip-shard", 1), ("unimlip-shard", 2)},
    "test_other_commands": {("unimlip-demo", 1), ("unimlip-demo", 2), ("unimlip-eval", 1), ("unimlip-eval", 2),
                            ("unimlip-finetune", 1), ("unimlip-finetune", 2), ("unimlip-export", 2),
                            ("unimlip-fetch-weights", 2), ("unimlip-submit", 2), ("unimlip-checkpoint", 2)},
}


def _run(*cmd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _all(cases: list[tuple]) -> list[subprocess.CompletedProcess]:
    """Run independent commands two at a time (the CPU count of the machine these tests are sized for)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda case: _run(*case), cases))


def test_the_table_names_tests_that_exist_and_agrees_with_this_file():
    rows = [ROW.match(line) for line in DOC.read_text(encoding="utf-8").splitlines()]
    rows = [(m.group(1), int(m.group(2)), re.findall(r"`([^`]+)`", m.group(3))) for m in rows if m]
    assert len(rows) >= 20
    for command, status, tests in rows:
        assert tests, (command, status)
        for test in tests:
            path, name = test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), test
    documented = {name: {(c, s) for c, s, tests in rows if HERE + name in tests} for name in CHECKED}
    assert documented == CHECKED


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exit") / "shards"
    done = _run(BIN / "unimlip-shard", "synthetic", "--n", "48", "--image-size", "32", "--max-size", "32",
                "--out", out, "--workers", "1", "--no-progress", "--no-audit")
    assert done.returncode == 0, done.stderr
    return out


def _files(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_config_errors_exit_2_before_anything_starts(shards, tmp_path):
    run_dir = tmp_path / "run"
    base = [BIN / "unimlip-train", "--config", TINY, "--run-dir", run_dir, f"data.train={shards / 'index.json'}",
            "data.val=", "data.image_size=32", "data.num_workers=0", "train.steps=2", "train.log_every=1",
            "train.warmup_steps=1", "train.micro_batch_size=8", "train.eval_every=0", "model.embed_dim=32"]
    (tmp_path / "empty").mkdir()
    cases = {  # override -> what the one line must say
        "trian.steps=5": "command line: unknown key 'trian'",
        f"model.tokenizer={tmp_path / 'missing'}": f"key 'model.tokenizer': no folder {tmp_path / 'missing'}",
        f"model.tokenizer={tmp_path / 'empty'}": f"model.tokenizer: cannot load tokenizer '{tmp_path / 'empty'}'",
        f"model.image.pretrained={tmp_path / 'r10.pth'}": f"model.image.pretrained={tmp_path / 'r10.pth'}: no such file",
        "model.fusion.heads=5": "the model cannot be built from this config: model.fusion.heads=5",
    }
    for (override, says), done in zip(cases.items(), _all([[*base, o] for o in cases])):
        assert done.returncode == 2, (override, done.stdout[-2000:], done.stderr[-3000:])
        assert says in done.stderr and "Traceback" not in done.stderr, (override, done.stderr[-3000:])
        assert not run_dir.exists(), override

    trained = _run(*base)
    assert trained.returncode == 0, trained.stderr[-3000:]
    before = _files(run_dir)
    other = _run(*base, "model.embed_dim=48")  # a checkpoint of another model shape: refused before any start
    assert other.returncode == 2 and "holds another model than this config builds" in other.stderr, other.stderr
    assert "model.embed_dim: 32 -> 48" in other.stderr and "Traceback" not in other.stderr
    assert _files(run_dir) == before


def _noise_manifest(root: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = ["image,text,group"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,FINDINGS: case {i}. IMPRESSION: no change.,p{i}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def _digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_shard_statuses_and_sigterm(tmp_path):
    manifest = _noise_manifest(tmp_path)
    shard = [BIN / "unimlip-shard", "manifest", "--manifest", manifest, "--shard-size", "10", "--workers", "2",
             "--no-progress", "--out"]
    reference = _run(*shard, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    # SIGTERM to the whole process group, as a scheduler sends it, once the first shard is written.
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([str(c) for c in [*shard, out]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("train-*.tar")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("unimlip-shard: interrupted by SIGTERM; "), err
    assert f"finished shard(s) kept in {out} (none half-written): rerun the same command to finish" in err
    finished = _run(*shard, out)  # the rerun finishes the job, identical to the uninterrupted run
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _digest(out) == _digest(tmp_path / "reference")

    verified = _run(BIN / "unimlip-shard", "verify", out, "--no-progress")
    assert verified.returncode == 0 and json.loads(verified.stdout.splitlines()[-1])["bad_samples"] == 0
    first = out / "train-000000.tar"
    first.write_bytes(first.read_bytes()[:first.stat().st_size * 6 // 10])
    lost = 10 - sum(ok for _, ok in naive_read(first))
    damaged = _run(BIN / "unimlip-shard", "verify", out, "--no-progress")
    assert damaged.returncode == 1 and lost >= 4, damaged.stdout
    assert json.loads(damaged.stdout.splitlines()[-1])["bad_by_shard"] == {"train-000000.tar": lost}
    (tmp_path / "bad.csv").write_text("image,report\nimg/0.png,x\n")
    refused = _run(BIN / "unimlip-shard", "manifest", "--manifest", tmp_path / "bad.csv", "--out", tmp_path / "b")
    assert refused.returncode == 2 and "missing required column(s) text" in refused.stderr


def test_other_commands(shards, tmp_path):
    missing = tmp_path / "missing"
    finetune = [BIN / "unimlip-finetune", "classify", "--checkpoint", missing, "--data", shards, "--label-key",
                "labels", "--out", tmp_path / "ft"]
    cases = [  # (command line, status, what stderr says)
        ([BIN / "unimlip-demo", "--out", tmp_path / "d1", "trian.steps=5"], 2, "unknown key 'trian'"),
        ([BIN / "unimlip-demo", "--out", tmp_path / "d2", "--samples", "0"], 1, "synthesize + shard failed"),
        ([BIN / "unimlip-eval", "retrieval", "--checkpoint", missing, "--data", shards], 1, "cannot load checkpoint"),
        ([BIN / "unimlip-eval", "retrieval", "--data", shards], 2, "--checkpoint"),
        ([*finetune, "--val-split", "val", "--test-split", "val"], 2, "--val-split val is also the test split"),
        ([*finetune], 2, "--test-split test: "),
        ([*finetune, "--test-split", "val"], 1, str(missing)),
        ([BIN / "unimlip-export", missing, "--out", tmp_path / "ex"], 2, "no such directory"),
        ([BIN / "unimlip-checkpoint", "inspect", missing], 2, "no such directory"),
        ([BIN / "unimlip-checkpoint", "reshard", missing, "--world-size", "2", "--out", tmp_path / "r"], 2,
         "no such directory"),
        ([BIN / "unimlip-fetch-weights", TINY, "--out", tmp_path / "w", "trian.x=1"], 2, "unknown key 'trian'"),
        ([BIN / "unimlip-submit", "train", "--config", TINY, "--run-dir", tmp_path / "s", "--dry-run",
          "trian.steps=5"], 2, "unknown key 'trian'"),
    ]
    for (cmd, status, says), done in zip(cases, _all([c for c, _, _ in cases])):
        assert done.returncode == status, (cmd[:2], done.stdout[-2000:], done.stderr[-3000:])
        assert says in done.stderr and "Traceback" not in done.stderr, (cmd[:2], done.stderr[-3000:])
