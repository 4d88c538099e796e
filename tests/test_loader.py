"""Streaming loader on real tar shards: exactness across ranks/workers, resume, safety, corruption."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import BertTokenizer

from unimlip_train.config.schema import Config
from unimlip_train.data.collate import BatchNeeds, batch_needs
from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.shards import resolve_sources
from unimlip_train.data.skips import SkipStats
from unimlip_train.data.tokenizer import load_tokenizer

WORDS = ("the heart size is normal lungs are clear no pleural effusion or pneumothorax mild opacity in left "
         "right lower upper lobe small stable nodule degenerative changes of spine findings impression").split()
SHARD_SIZES = (50, 30, 60, 40, 36, 40)  # 256 samples: windows of 4 units straddle shard boundaries


def _jpeg(i: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _report(i: int) -> str:
    rng = np.random.default_rng(10_000 + i)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) + "." for _ in range(rng.integers(2, 5))]
    return f"INDICATION: cough. FINDINGS: {' '.join(sentences)} IMPRESSION: sample {i} XXXX."


def _sample(i: int) -> dict:
    return {"__key__": f"s{i:05d}", "jpg": _jpeg(i), "txt": _report(i).encode(),
            "json": json.dumps({"labels": [f"l{i % 3}"], "source": "test"}).encode()}


def write_shards(out, sizes=SHARD_SIZES, split="train", extra=None, index=True):
    """Shards `{split}-NNNNNN.tar` + index.json, like the writer's; `extra(i, sample)` may alter a sample."""
    os.makedirs(out, exist_ok=True)
    shards, i = [], 0
    for n_shard, n in enumerate(sizes):
        name = f"{split}-{n_shard:06d}.tar"
        with wds.TarWriter(os.path.join(out, name)) as w:
            for _ in range(n):
                sample = _sample(i)
                if extra:
                    extra(i, sample)
                w.write(sample)
                i += 1
        shards.append({"name": name, "samples": n, "bytes": os.path.getsize(os.path.join(out, name)), "sha256": ""})
    if index:
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump({"splits": {split: {"samples": i, "shards": shards}}, "errors": 0}, f)
    return [f"s{k:05d}" for k in range(i)]


def word_tokenizer(folder):
    """A word-level BERT tokenizer over the synthetic reports' words, saved in ``folder`` and loaded back."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ":", "sample", "cough", "indication"] + \
        sorted(set(WORDS)) + [str(d) for d in range(10)]
    BertTokenizer(vocab={w: k for k, w in enumerate(vocab)}).save_pretrained(str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    write_shards(str(d))
    return str(d)


def make_cfg(train, workers=2, mb=8, **data):
    cfg = Config()
    cfg.data.train = train
    cfg.data.image_size = 32
    cfg.data.num_workers = workers
    cfg.data.shuffle_buffer = 40
    cfg.data.text.max_length = 24
    cfg.data.text.span_mask_p = 0.5
    cfg.train.micro_batch_size = mb
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


ALL = BatchNeeds(image_view2=True, text_view2=True, mlm=True)


def take(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_sources_and_counts(clean_dir, tmp_path):
    (src,) = resolve_sources(clean_dir)
    assert src.counts == list(SHARD_SIZES) and src.total == 256
    pattern = os.path.join(clean_dir, "train-{000000..000005}.tar")
    assert resolve_sources(pattern)[0].counts == list(SHARD_SIZES)  # counts via the neighbouring index.json
    write_shards(str(tmp_path), sizes=(7, 5), index=False)  # no index: counted by reading
    mixed = resolve_sources([{"path": str(tmp_path), "weight": 3.0}, {"path": os.path.join(clean_dir, "index.json")}])
    assert mixed[0].counts == [7, 5] and mixed[0].weight == 3.0 and mixed[1].total == 256
    with pytest.raises(ValueError, match="no split 'val'"):
        resolve_sources(clean_dir, "val")


def test_batch_needs():
    cfg = Config()
    assert batch_needs(cfg.loss) == BatchNeeds(True, True, True)
    cfg.loss.image_ssl.weight = 0.0
    cfg.loss.mlm.weight = 0.0
    assert batch_needs(cfg.loss) == BatchNeeds(image_view2=False, text_view2=True, mlm=False)


def test_round_trip_two_ranks_two_workers(clean_dir, tokenizer):
    cfg = make_cfg(clean_dir)
    streams = [TrainStream(cfg, tokenizer, ALL, rank=r, world_size=2) for r in range(2)]
    spe = streams[0].steps_per_epoch
    assert spe == streams[1].steps_per_epoch == 16  # 256 / (2 ranks x 8) exactly: nothing dropped
    runs = [take(s, 2 * spe) for s in streams]
    epochs = [[keys(run[e * spe:(e + 1) * spe]) for e in range(2)] for run in runs]
    all_keys = {f"s{k:05d}" for k in range(256)}
    for e in range(2):
        seen = epochs[0][e] + epochs[1][e]
        assert len(seen) == len(set(seen)) == 256 and set(seen) == all_keys
    assert epochs[0][0] != epochs[0][1]  # the next epoch reshuffles
    b = runs[0][0]
    assert b["image"].shape == b["image_view2"].shape == (8, 1, 32, 32) and b["image"].dtype == torch.float32
    assert not torch.equal(b["image"], b["image_view2"])
    assert b["input_ids"].shape == b["text_view2_ids"].shape == b["mlm_input_ids"].shape == (8, 24)
    assert ((b["mlm_labels"] != -100).sum(1) > 0).all()
    again = take(TrainStream(cfg, tokenizer, ALL, rank=0, world_size=2), spe)
    assert keys(again) == epochs[0][0]  # same seed, same order
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(again, runs[0]))


def test_uneven_data_drops_few_and_rotates(tmp_path, tokenizer):
    write_shards(str(tmp_path), sizes=(23, 31, 17, 29, 11))  # 111 samples, 3 ranks x 2 workers x 4
    cfg = make_cfg(str(tmp_path), workers=2, mb=4)
    streams = [TrainStream(cfg, tokenizer, BatchNeeds(), rank=r, world_size=3) for r in range(3)]
    spe = streams[0].steps_per_epoch
    assert all(s.steps_per_epoch == spe for s in streams)
    seen = [keys(take(TrainStream(cfg, tokenizer, BatchNeeds(), rank=r, world_size=3), 3 * spe)) for r in range(3)]
    per_epoch = [[k for s in seen for k in s[e * spe * 4:(e + 1) * spe * 4]] for e in range(3)]
    for ks in per_epoch:
        assert len(ks) == len(set(ks)) == 3 * spe * 4 and 111 - len(ks) < 3 * 2 * 4
    assert len(set().union(*per_epoch)) > len(per_epoch[0])  # dropped samples differ between epochs


@pytest.mark.parametrize("workers,consumed,resampled", [(0, 5, False), (1, 11, False), (2, 7, False),
                                                       (2, 13, False), (2, 9, True)])
def test_resume_is_exact(tmp_path, tokenizer, workers, consumed, resampled):
    write_shards(str(tmp_path), sizes=(30, 26, 40))  # 96 samples
    cfg = make_cfg(str(tmp_path), workers=workers, mb=6, resampled=resampled)
    full_stream = TrainStream(cfg, tokenizer, ALL, rank=1, world_size=2)
    spe = full_stream.steps_per_epoch
    total = 2 * spe + 2  # resume points both mid-epoch and in the second epoch
    full = take(full_stream, total)
    first = TrainStream(cfg, tokenizer, ALL, rank=1, world_size=2)
    head = take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))
    resumed_stream = TrainStream(cfg, tokenizer, ALL, rank=1, world_size=2)
    resumed_stream.load_state_dict(state)
    tail = take(resumed_stream, total - consumed)
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"]
        for name in ("image", "image_view2", "input_ids", "attention_mask", "text_view2_ids", "mlm_input_ids",
                     "mlm_labels"):
            assert torch.equal(a[name], b[name]), name
    first_epoch = keys((head + tail)[:spe])
    assert len(first_epoch) == len(set(first_epoch))  # no sample twice, none lost (compared to `full`)


def test_weighted_mix_of_sources(tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(a), sizes=(20, 20))
    write_shards(str(b), sizes=(15, 15), extra=lambda i, s: s.update(__key__=f"b{i:05d}"))
    cfg = make_cfg([{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}], workers=2, mb=5,
                   samples_per_epoch=80)
    stream = TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=1)
    assert stream.steps_per_epoch == 16
    batches = take(stream, 16)
    epoch = keys(batches)
    views: dict = {}
    for batch in batches:
        for key, image in zip(batch["key"], batch["image"]):
            views.setdefault(key, []).append(image)
    assert all(not torch.equal(*views[k]) for k in views if len(views[k]) == 2)  # repeats are re-augmented
    from_b = [k for k in epoch if k.startswith("b")]
    assert len(from_b) == 60 and len(epoch) - len(from_b) == 20  # exact 1:3 quotas
    assert len(set(from_b)) == 30  # the small source is repeated: each of its samples twice
    assert all(from_b.count(k) == 2 for k in set(from_b))
    assert epoch != sorted(epoch, key=lambda k: k[0])  # interleaved, not concatenated


def test_resume_with_other_workers_restarts_at_the_next_epoch(clean_dir, tokenizer, caplog):
    cfg = make_cfg(clean_dir)
    stream = TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=2)
    take(stream, 3)
    state = stream.state_dict()
    other = TrainStream(make_cfg(clean_dir, workers=1), tokenizer, BatchNeeds(), rank=0, world_size=2)
    with caplog.at_level(logging.WARNING, logger="unimlip_train.data.loader"):
        other.load_state_dict(state)
    assert "workers 2 -> 1" in caplog.text and "restarts at the beginning of epoch 1" in caplog.text
    assert other.epoch == 1
    fresh = TrainStream(make_cfg(clean_dir, workers=1), tokenizer, BatchNeeds(), rank=0, world_size=2)
    spe = fresh.steps_per_epoch
    assert keys(take(other, spe)) == keys(take(fresh, 2 * spe)[spe:])  # exactly the next epoch of a fresh run
    with pytest.raises(ValueError, match="rank 0 of 2 ranks given to rank 1 of 2"):
        TrainStream(cfg, tokenizer, BatchNeeds(), rank=1, world_size=2).load_state_dict(state)


def _rows(batches):
    """Per-sample rows of a run of batches: key -> every tensor of that sample (batch shape left out)."""
    names = ("image", "image_view2", "input_ids", "text_view2_ids", "mlm_input_ids", "mlm_labels")
    return [(k, [b[n][i] for n in names]) for b in batches for i, k in enumerate(b["key"])]


def _same_rows(got, want):
    assert [k for k, _ in got] == [k for k, _ in want]
    for (k, a), (_, b) in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), k


def test_resume_with_another_micro_batch_continues_exactly(tmp_path, tokenizer):
    write_shards(str(tmp_path), sizes=(30, 26, 40))  # 96 samples, one rank of two: 48 per epoch
    per_sample = TrainStream(make_cfg(str(tmp_path), workers=0, mb=1), tokenizer, ALL, rank=1, world_size=2)
    reference = _rows(take(per_sample, 2 * 48))  # the unit's own sample order, epoch 0 then epoch 1
    first = TrainStream(make_cfg(str(tmp_path), workers=0, mb=6), tokenizer, ALL, rank=1, world_size=2)
    head = take(first, 3)  # 18 samples into epoch 0
    resumed = TrainStream(make_cfg(str(tmp_path), workers=0, mb=5), tokenizer, ALL, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    # epoch 0 with batches of 5 takes 45 samples: 27 are left after the 18, so 5 batches (2 dropped)
    tail = take(resumed, 5 + 9)
    _same_rows(_rows(head + tail[:5]), reference[:18 + 25])
    _same_rows(_rows(tail[5:]), reference[48:48 + 45])  # epoch 1 whole, in batches of 5
    assert resumed.epoch == 2

    # With loader workers: every sample of the epoch once, none lost but the dropped remainder.
    cfg2 = make_cfg(str(tmp_path), workers=2, mb=4)
    first = TrainStream(cfg2, tokenizer, BatchNeeds(), rank=1, world_size=2)
    head = take(first, 3)
    resumed = TrainStream(make_cfg(str(tmp_path), workers=2, mb=3), tokenizer, BatchNeeds(), rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    # 24 samples per worker and epoch; the head took 8 of one worker's and 4 of the other's, which leaves them
    # 16 and 20 samples: 5 and 6 batches of 3, the remainders (1 and 2) dropped like any epoch's remainder.
    epoch0 = keys(head) + keys(take(resumed, 11))
    full = set(keys(take(TrainStream(cfg2, tokenizer, BatchNeeds(), rank=1, world_size=2), 12)))
    assert len(epoch0) == len(set(epoch0)) == 45 and set(epoch0) < full


def test_resume_with_another_shuffle_buffer_finishes_the_epoch_in_order(tmp_path, tokenizer, caplog):
    write_shards(str(tmp_path), sizes=(30, 26, 40))
    cfg = make_cfg(str(tmp_path), workers=2, mb=4)
    spe = TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=2).steps_per_epoch
    full = take(TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=2), spe)
    first = TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=2)
    head = take(first, 5)
    small = make_cfg(str(tmp_path), workers=2, mb=4, shuffle_buffer=3)
    resumed = TrainStream(small, tokenizer, BatchNeeds(), rank=0, world_size=2)
    with caplog.at_level(logging.WARNING, logger="unimlip_train.data.loader"):
        resumed.load_state_dict(first.state_dict())
    assert "shuffle buffer 40 -> 3" in caplog.text and "applies from epoch 1" in caplog.text
    tail = take(resumed, 2 * spe - 5)
    assert keys(head + tail[:spe - 5]) == keys(full)  # epoch 0 in its saved order
    fresh_small = take(TrainStream(small, tokenizer, BatchNeeds(), rank=0, world_size=2), 2 * spe)
    assert keys(tail[spe - 5:]) == keys(fresh_small[spe:])  # epoch 1 with the new buffer


class _Trap:
    """Unpickling this creates a file: proof that shard content was (or was not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_member_never_executed(tmp_path, tokenizer):
    trap = tmp_path / "pwned"
    payload = pickle.dumps(_Trap(str(trap)))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Trap(str(probe)))).close()
    assert probe.exists()  # the trap is live: unpickling would create the file

    def add_pickles(i, sample):
        sample["pickle"] = payload
        sample["pyd"] = payload

    data = tmp_path / "shards"
    write_shards(str(data), sizes=(12, 12), extra=add_pickles)
    for workers in (0, 2):
        cfg = make_cfg(str(data), workers=workers, mb=4)
        batches = take(TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=1), 6)
        assert len(set(keys(batches))) == 24
        assert sum(len(b["key"]) for b in build_eval_loader(cfg, str(data), tokenizer, 5, 0, 1, split="train")) == 24
    assert not trap.exists()


def test_corrupt_samples_skipped_and_counted(tmp_path, tokenizer, caplog):
    bad_image, bad_json = {3, 25}, {17}

    def corrupt(i, sample):
        if i in bad_image:
            sample["jpg"] = sample["jpg"][:20] + b"\x00garbage" * 4
        if i in bad_json:
            sample["json"] = b"{not json"

    data = tmp_path / "shards"
    write_shards(str(data), sizes=(20, 20, 20), extra=corrupt)
    shard = data / "train-000002.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2 + 100])  # truncated tar: index.json still claims 20 samples
    cfg = make_cfg(str(data), workers=0, mb=4)
    with caplog.at_level(logging.WARNING, logger="unimlip_train.data.skips"):
        evaluated = keys(build_eval_loader(cfg, str(data), tokenizer, 8, 0, 1, split="train"))
    good = {f"s{i:05d}" for i in range(60) if i not in bad_image | bad_json}
    complete_shards = {k for k in good if int(k[1:]) < 40}
    assert complete_shards <= set(evaluated) <= good  # everything readable, nothing corrupt
    assert len(evaluated) == len(set(evaluated)) < len(good)  # the truncated shard lost its tail
    assert any("skipping corrupt" in r.getMessage() for r in caplog.records)
    stream = TrainStream(cfg, tokenizer, BatchNeeds(), rank=0, world_size=1)
    batches = take(stream, 2 * stream.steps_per_epoch)  # the stream never runs dry, whole epochs come out
    assert len(batches) == 2 * stream.steps_per_epoch == 30
    truncated, shard0, shard1 = (str(data / f"train-00000{i}.tar") for i in (2, 0, 1))
    lost = 20 - len([k for k in evaluated if int(k[1:]) >= 40])  # samples the truncated tar no longer yields
    # Without a shuffle buffer every sample read is either delivered or skipped, and every sample the index
    # promised but the truncated tar lacks is skipped. An epoch reads all 3 shards (its window), then tops up
    # from the next pass to make up for the losses, meeting the same bad samples again.
    plain = TrainStream(make_cfg(str(data), workers=0, mb=4, shuffle_buffer=0), tokenizer, BatchNeeds(), 0, 1)
    take(plain, plain.steps_per_epoch)
    first_epoch = plain.skip_stats()
    assert first_epoch.read == 60 + first_epoch.skipped
    assert first_epoch.by_shard[shard0] >= 2 and first_epoch.by_shard[shard1] >= 1
    assert first_epoch.by_shard[truncated] % lost == 0 and first_epoch.by_shard[truncated] >= lost > 2
    take(plain, plain.steps_per_epoch)
    stats = plain.skip_stats()
    assert stats.read == 120 + stats.skipped and set(stats.by_shard) == {shard0, shard1, truncated}
    assert stats.by_shard[truncated] >= 2 * lost and stats.worst(1) == [(truncated, stats.by_shard[truncated])]

    # Counted exactly across a resume, with loader workers: the replayed raw samples are not counted again.
    cfg2 = make_cfg(str(data), workers=2, mb=4)
    whole = TrainStream(cfg2, tokenizer, BatchNeeds(), rank=0, world_size=1)
    spe = whole.steps_per_epoch
    take(whole, spe + 3)
    for cut in (3, spe + 1):
        part = TrainStream(cfg2, tokenizer, BatchNeeds(), rank=0, world_size=1)
        take(part, cut)
        resumed = TrainStream(cfg2, tokenizer, BatchNeeds(), rank=0, world_size=1)
        resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
        take(resumed, spe + 3 - cut)
        assert resumed.skip_stats() == whole.skip_stats(), cut

    # data.max_skip_fraction: over at least MIN_READ samples, more than the fraction stops, naming the shards.
    assert stats.exceeded(1.0) == ""
    assert stats.exceeded(stats.skipped / SkipStats.MIN_READ) == ""
    message = stats.exceeded(0.01)
    assert message.startswith(f"{stats.skipped} of {stats.read} samples read") and truncated in message
    assert message.index(truncated) < message.index("train-000000.tar") < message.index("train-000001.tar")
    big = SkipStats({"a.tar": 15}, read=2000)
    assert big.exceeded(0.01) == "" and big.exceeded(0.007) != ""
    assert SkipStats.combine([big, stats]).by_shard["a.tar"] == 15


def test_eval_loader_exactly_once(clean_dir, tokenizer):
    cfg = make_cfg(clean_dir, workers=2)
    seen, batches = [], []
    for rank in range(3):
        for batch in build_eval_loader(cfg, clean_dir, tokenizer, 7, rank, 3, split="train"):
            batches.append(batch)
            seen += batch["key"]
    assert sorted(seen) == [f"s{k:05d}" for k in range(256)]
    b = batches[0]
    assert set(b) == {"image", "input_ids", "attention_mask", "key", "text", "labels", "meta"}
    assert b["meta"][0]["source"] == "test"
    i = int(b["key"][0][1:])
    assert b["labels"][0] == [f"l{i % 3}"] and "XXXX" not in b["text"][0] and "cough" not in b["text"][0]
    again = next(iter(build_eval_loader(cfg, clean_dir, tokenizer, 7, 0, 3, split="train")))
    assert torch.equal(again["image"], next(iter(build_eval_loader(cfg, clean_dir, tokenizer, 7, 0, 3,
                                                                    split="train")))["image"])


def test_each_epoch_draws_new_views_and_masks(tmp_path, tokenizer):
    """Augmentation is seeded per sample *and epoch*: epoch 2 must not replay epoch 1's views and MLM masks."""
    write_shards(str(tmp_path), sizes=(24,))
    stream = TrainStream(make_cfg(str(tmp_path), workers=0, mb=6), tokenizer, ALL, rank=0, world_size=1)
    spe = stream.steps_per_epoch
    batches = take(stream, 2 * spe)
    epochs = [{key: {name: b[name][i] for name in ("image", "image_view2", "text_view2_ids", "mlm_input_ids")}
               for b in batches[e * spe:(e + 1) * spe] for i, key in enumerate(b["key"])} for e in range(2)]
    assert epochs[0].keys() == epochs[1].keys() and len(epochs[0]) == 24  # the same samples, both epochs
    for name in ("image", "image_view2"):  # random crops: a repeated view would be a replayed seed
        assert not any(torch.equal(epochs[0][k][name], epochs[1][k][name]) for k in epochs[0]), name
    for name in ("text_view2_ids", "mlm_input_ids"):  # short reports: some may coincide by chance, not most
        same = sum(torch.equal(epochs[0][k][name], epochs[1][k][name]) for k in epochs[0])
        assert same < len(epochs[0]) // 2, (name, same)


def test_each_epoch_reshuffles_which_shards_a_rank_reads(tmp_path, tokenizer):
    """Shard order is seeded per epoch: a rank must not read the same shards (samples) every epoch."""
    write_shards(str(tmp_path), sizes=(8,) * 10)
    cfg = make_cfg(str(tmp_path), workers=1, mb=4)
    streams = [TrainStream(cfg, tokenizer, BatchNeeds(), rank=r, world_size=2) for r in range(2)]
    spe = streams[0].steps_per_epoch
    seen = [[set(keys(run[e * spe:(e + 1) * spe])) for e in range(3)] for run in (take(s, 3 * spe) for s in streams)]
    for e in range(3):
        assert not seen[0][e] & seen[1][e] and len(seen[0][e] | seen[1][e]) == 80  # each epoch: all, once
    assert seen[0][0] != seen[0][1] and seen[0][1] != seen[0][2], "rank 0 reads the same samples every epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_twice_is_exact(tmp_path, tokenizer, workers):
    """Two resumes in one epoch (a requeued job requeued again): the saved raw-sample position must count
    from the epoch start, not from the last resume, or the second resume replays samples."""
    write_shards(str(tmp_path), sizes=(30, 26, 40))
    cfg = make_cfg(str(tmp_path), workers=workers, mb=6)
    full_stream = TrainStream(cfg, tokenizer, ALL, rank=0, world_size=2)
    spe = full_stream.steps_per_epoch
    full = take(full_stream, spe)
    pieces, state = [], None
    for n in (2, 3, spe - 5):  # resume after batch 2 and again after batch 5, both mid-epoch
        stream = TrainStream(cfg, tokenizer, ALL, rank=0, world_size=2)
        if state is not None:
            stream.load_state_dict(state)
        pieces += take(stream, n)
        state = json.loads(json.dumps(stream.state_dict()))
    assert keys(pieces) == keys(full)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mlm_input_ids"], b["mlm_input_ids"])
               for a, b in zip(full, pieces))
