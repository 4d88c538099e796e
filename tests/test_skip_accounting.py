"""Every lost sample counted once, per shard, by one counter: real shards damaged (truncated, garbled images, a
garbled tar header), compared with a naive count of what the damaged shards really lost."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea

from damaged_shards import expected_skips, garble_header, garble_images, naive_loss, real_shards, shard_table, truncate
from data_prep.verify import verify_dir
from unimlip_train.config.schema import Config
from unimlip_train.data.collate import BatchNeeds
from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MB = 8


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, dict]:
    """200 real pairs in 10 train shards of 20; three of them damaged; their naive table."""
    shards = real_shards(tmp_path_factory.mktemp("damaged"))
    names = sorted(shards.glob("train-*.tar"))
    truncate(names[2], 0.55)
    garble_images(names[5], {1, 7, 8, 15})
    garble_header(names[7], 31)  # inside the 11th sample: it and the 9 after it are lost
    table = shard_table(shards)
    loss = naive_loss(table)
    assert {Path(s).name for s, n in loss.items() if n} == {names[i].name for i in (2, 5, 7)}
    assert loss[str(names[5])] == 4 and loss[str(names[7])] == 10 and loss[str(names[2])] > 5
    return shards, table


def _cfg(shards: Path, workers: int, buffer: int) -> Config:
    cfg = Config()
    cfg.data.train = str(shards / "index.json")
    cfg.data.image_size, cfg.data.num_workers, cfg.data.shuffle_buffer = 32, workers, buffer
    cfg.data.text.max_length = 32
    cfg.train.micro_batch_size = MB
    return cfg


def test_stream_counts_what_the_shards_lost(damaged):
    """One unit without a shuffle buffer: the counts equal the naive replay of the delivered keys, epoch by
    epoch; with workers and a buffer, read = delivered + skipped at every batch, and whole epochs lose whole
    shards' worth."""
    shards, table = damaged
    tokenizer = load_tokenizer("")
    stream = TrainStream(_cfg(shards, workers=0, buffer=0), tokenizer, BatchNeeds(), 0, 1)
    spe = stream.steps_per_epoch
    epochs: list[list[str]] = [[] for _ in range(3)]
    for n, batch in enumerate(stream, start=1):
        epochs[(n - 1) // spe] += batch["key"]
        stats = stream.skip_stats()
        assert stats.read == n * MB + stats.skipped
        if n % spe == 0 or n == 2 * spe + 5:
            assert stats.by_shard == expected_skips(table, epochs[:(n - 1) // spe + 1]), n
        if n == 2 * spe + 5:
            break
    loss = naive_loss(table)
    assert all(stats.by_shard[s] >= 2 * n for s, n in loss.items() if n)  # two whole passes at least

    buffered = TrainStream(_cfg(shards, workers=2, buffer=30), tokenizer, BatchNeeds(), 0, 1)
    for n, _ in enumerate(buffered, start=1):
        stats = buffered.skip_stats()
        assert stats.read == n * MB + stats.skipped
        if n == 2 * buffered.steps_per_epoch:
            break
    assert set(stats.by_shard) == {s for s, n in loss.items() if n}

    # unimlip-shard verify --decode counts the same bad samples, shard by shard.
    assert verify_dir(shards, decode=True).bad_by_shard == {Path(s).name: n for s, n in loss.items() if n}

    # Evaluation reads every sample once: it keeps exactly the usable ones.
    got = [k for b in build_eval_loader(_cfg(shards, 0, 0), str(shards), tokenizer, 16, 0, 1, split="train")
           for k in b["key"]]
    assert sorted(got) == sorted(k for _, read in table.values() for k, ok in read if ok)


def _train(run_dir: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [BIN / "unimlip-train", "--config", REPO / "configs" / "tiny_cpu.yaml", "--run-dir", run_dir,
           f"data.train={shards / 'index.json'}", "data.val=", "data.image_size=32", "data.num_workers=1",
           "data.shuffle_buffer=0", f"train.micro_batch_size={MB}", "train.log_every=1", "train.warmup_steps=1",
           "train.checkpoint_every=0", "model.embed_dim=32", *overrides]
    env = dict(os.environ, UNIMLIP_LOG_SAMPLE_KEYS="1")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.mark.multiprocess
def test_training_counts_one_way_everywhere(damaged, tmp_path):
    """A run stops for corrupt data with its summary line (status corrupt_data); resumed with a looser limit it
    finishes. The summary, the last log line's running total, TensorBoard and metrics.jsonl agree, and equal the
    naive replay of the sample keys the run trained on."""
    shards, table = damaged
    run = tmp_path / "run"
    stopped = _train(run, shards, "train.steps=30", "data.max_skip_fraction=0.01")
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = lines[-1]
    assert first["split"] == "summary" and first["status"] == "corrupt_data" and first["skipped_samples"] > 10
    assert f"{first['skipped_samples']} of {first['samples_read']} samples read were corrupt" in stopped.stderr

    finished = _train(run, shards, "train.steps=30", "data.max_skip_fraction=1")
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary, last = lines[-1], [x for x in lines if x["split"] == "train"][-1]
    assert summary["status"] == "finished" and summary["step"] == last["step"] == 30
    # One counter: the summary, metrics.jsonl, the console's running total and TensorBoard.
    assert summary["samples_read"] == 30 * MB + summary["skipped_samples"]
    assert last["skipped_samples"] == summary["skipped_samples"] and last["samples_read"] == summary["samples_read"]
    assert {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("skipped_by_shard/")} == \
        {os.path.basename(s): n for s, n in summary["skipped_by_shard"].items()}
    step_lines = [x for x in finished.stdout.splitlines() if x.startswith("step 30/30")]
    assert step_lines and step_lines[0].endswith(
        f"; {summary['skipped_samples']} corrupt samples skipped of {summary['samples_read']} read")
    events = ea.EventAccumulator(str(run / "tb"))
    events.Reload()
    assert events.Scalars("train/skipped_samples")[-1].value == summary["skipped_samples"]

    # The naive replay of what was trained on (the keys of every step, once: a resumed launch starts after the
    # stop's checkpoint), epoch by epoch.
    steps: dict[int, list] = {}
    for line in (run / "debug" / "sample_keys.rank0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"]] = entry["keys"]
    spe = sum(count for count, _ in table.values()) // MB
    epochs = [[k for step in range(e * spe + 1, min(30, (e + 1) * spe) + 1) for k in steps[step]]
              for e in range(-(-30 // spe))]
    assert summary["skipped_by_shard"] == expected_skips(table, epochs)
    logs = stopped.stderr + finished.stderr
    # DeepSpeed's routine lines are filtered (the op build, torch's deprecation warning it triggers)
    assert "built successfully" not in stopped.stdout + finished.stdout and "all_gather_into_tensor" not in logs
    assert re.search(r"shard \S+train-000002\.tar ended \d+ sample\(s\) short", logs)
    assert re.search(r"skipping corrupt sample \S+ of \S+train-000005\.tar: ValueError: neither a readable JPEG nor PNG", logs)
