"""The data stream across a layout change (``data/remainder.py``), on real tar shards in one process: the rest of
an interrupted epoch is delivered exactly once on another number of ranks x workers, a reshard back before any
batch restores the old units exactly, a second reshard in the same epoch recuts the recut, corrupt-sample counts
carry over, and later epochs follow the plan for the new layout. Each check counts against the shards' own keys."""
from __future__ import annotations

import collections
import json
import logging

import pytest
import torch
import webdataset as wds
from test_loader import ALL, keys, make_cfg, take, word_tokenizer, write_shards

from unimlip_train.data.collate import BatchNeeds
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.plan import epoch_pieces
from unimlip_train.data.remainder import PlanFacts, StreamView, consumed, fresh_spec
from unimlip_train.data.shards import iter_raw_samples

SIZES = (50, 30, 60, 40, 36, 40)  # 256 samples in shards of uneven size


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def _streams(path, tok, world, workers, mb=8, needs=BatchNeeds(), **data):
    cfg = make_cfg(path, workers=workers, mb=mb, **data)
    return [TrainStream(cfg, tok, needs, rank, world) for rank in range(world)]


def _states(streams) -> list:
    return [json.loads(json.dumps(s.state_dict())) for s in streams]  # as a checkpoint would hold them


def _resumed(path, tok, states, world, workers, mb=8, needs=BatchNeeds(), **data):
    new = _streams(path, tok, world, workers, mb, needs, **data)
    for stream in new:
        stream.resume(lambda r: states[r], len(states))
    return new


def _epoch_keys(stream, epoch) -> list:
    """Every key the stream delivers while its batches belong to ``epoch`` (stops at the first later batch)."""
    out = []
    for batch in stream:
        if stream.last_epoch != epoch:
            break
        out += batch["key"]
    return out


@pytest.mark.parametrize("old,new,drawn", [((2, 2), (3, 1), 5), ((3, 1), (1, 2), 4), ((1, 2), (2, 2), 3),
                                           ((2, 1), (2, 2), 6)])
def test_the_rest_of_the_epoch_is_delivered_exactly_once(tmp_path, tok, old, new, drawn):
    every = set(write_shards(str(tmp_path), sizes=SIZES))
    first = _streams(str(tmp_path), tok, *old)
    before = [k for s in first for k in keys(take(s, drawn))]
    resumed = _resumed(str(tmp_path), tok, _states(first), *new)
    info = resumed[0].resharded
    assert info["epoch"] == 0 and info["from"] == old and info["to"] == new
    assert info["remaining"] == 256 - len(before)  # nothing corrupt: every raw sample pulled was delivered
    after = [_epoch_keys(s, 0) for s in resumed]
    assert len({len(a) for a in after}) == 1  # every rank the same number of batches: no rank waits in a collective
    seen = before + [k for a in after for k in a]
    assert not [k for k, n in collections.Counter(seen).items() if n > 1]  # no sample twice
    units = new[0] * new[1]
    assert len(every - set(seen)) < units * 8 + units  # none missing but the whole-micro-batch remainder


def test_later_epochs_follow_the_plan_for_the_new_layout(tmp_path, tok):
    write_shards(str(tmp_path), sizes=SIZES)
    first = _streams(str(tmp_path), tok, 2, 2)
    for s in first:
        take(s, 5)
    resumed = _resumed(str(tmp_path), tok, _states(first), 3, 1)
    fresh = _streams(str(tmp_path), tok, 3, 1)
    for stream, plain in zip(resumed, fresh):
        _epoch_keys(stream, 0)  # consumes the first batch of epoch 1 as well
        spe = plain.steps_per_epoch
        epoch1 = keys(take(plain, 2 * spe)[spe:])
        assert keys(take(stream, spe - 1)) == epoch1[8:]


def test_a_reshard_back_before_any_batch_restores_the_old_units_exactly(tmp_path, tok):
    write_shards(str(tmp_path), sizes=SIZES)
    whole = [keys(take(s, 12)) for s in _streams(str(tmp_path), tok, 2, 2, needs=ALL)]
    first = _streams(str(tmp_path), tok, 2, 2, needs=ALL)
    head = [take(s, 5) for s in first]
    three = _resumed(str(tmp_path), tok, _states(first), 3, 1, needs=ALL)
    assert all("view" in s.state_dict() for s in three)  # nothing drawn at 3 ranks: the old layout's view
    back = _resumed(str(tmp_path), tok, _states(three), 2, 2, needs=ALL)
    assert all(s.resharded is None for s in back)
    reference = _streams(str(tmp_path), tok, 2, 2, needs=ALL)
    for rank, stream in enumerate(back):
        tail = take(stream, 7)
        assert keys(head[rank] + tail) == whole[rank]
        want = take(reference[rank], 12)[5:]
        assert all(torch.equal(a[n], b[n]) for a, b in zip(tail, want) for n in ("image", "image_view2", "mlm_input_ids"))


def test_a_second_reshard_in_the_same_epoch_recuts_the_recut(tmp_path, tok, caplog):
    every = set(write_shards(str(tmp_path), sizes=SIZES))
    first = _streams(str(tmp_path), tok, 2, 2)
    seen = [k for s in first for k in keys(take(s, 3))]
    three = _resumed(str(tmp_path), tok, _states(first), 3, 1)
    seen += [k for s in three for k in keys(take(s, 2))]
    state = _states(three)
    assert all("view" not in s and s["recuts"] for s in state)  # drawn at 3 ranks: the recut and its parent
    assert len(json.dumps(state[0])) < 8000  # positions and counts, never key lists
    one = _resumed(str(tmp_path), tok, state, 1, 2)
    assert one[0].resharded["remaining"] == 256 - len(seen)
    seen += _epoch_keys(one[0], 0)
    assert len(seen) == len(set(seen)) and len(every - set(seen)) < 2 * 8 + 2


def test_corrupt_samples_carry_over_summed(tmp_path, tok):
    """Undecodable samples are consumed like any other (not delivered again); the skip counts of all old units
    continue, summed, on the new layout. (A unit left short by corrupt samples tops up from the positions after its
    share, as in any epoch, so at most that many samples can come twice.)"""
    bad = {5, 77, 140, 201}

    def corrupt(i, sample):
        if i in bad:
            sample["jpg"] = b"not a jpeg"

    every = set(write_shards(str(tmp_path), sizes=SIZES, extra=corrupt))
    first = _streams(str(tmp_path), tok, 2, 2, shuffle_buffer=16)
    seen = [k for s in first for k in keys(take(s, 5))]
    old = [s.skip_stats() for s in first]
    resumed = _resumed(str(tmp_path), tok, _states(first), 3, 1, shuffle_buffer=16)
    assert [s.skip_stats().skipped for s in resumed] == [sum(o.skipped for o in old), 0, 0]
    assert [s.skip_stats().read for s in resumed] == [sum(o.read for o in old), 0, 0]
    seen += [k for s in resumed for k in _epoch_keys(s, 0)]
    assert len(seen) - len(set(seen)) <= len(bad)
    assert not {f"s{i:05d}" for i in bad} & set(seen)
    assert len(every - set(seen) - {f"s{i:05d}" for i in bad}) < 3 * 8 + 3 + len(bad)
    assert sum(s.skip_stats().skipped for s in resumed) == len(bad)  # each corrupt sample met once this epoch


def _position_keys(src, sidx: int, upto: int) -> list:
    """The key at each position 0..upto-1 of a source's epoch-0 sequence (None where its shard lacks it), read
    from the shards themselves."""
    out = []
    for url, first, stop, _ in epoch_pieces(src, 0, 0, sidx, 0):
        present = [r["__key__"] for r in iter_raw_samples(url, wds.ignore_and_continue)]
        out += [present[i] if i < len(present) else None for i in range(first, stop)]
        if len(out) >= upto:
            return out[:upto]
    return out


def test_the_replay_names_exactly_the_samples_a_unit_consumed(tmp_path, tok):
    """``remainder.consumed`` (integers only) against the keys the unit really delivered: two weighted sources
    through a shuffle buffer; then a truncated shard, whose lost positions keep their place in the replay."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(a), sizes=(20, 25, 15))
    write_shards(str(b), sizes=(18, 22), extra=lambda i, s: s.update(__key__=f"b{i:05d}"))
    sources = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 2.0}]
    (stream,) = _streams(sources, tok, 1, 1, mb=4, samples_per_epoch=90)
    got = keys(take(stream, 7))
    cursor, plan = stream.state_dict()["cursors"][0], stream.plan
    positions = consumed(fresh_spec(plan, 1, 0), plan, 0, cursor["raw"], cursor["bufsize"])
    named = [_position_keys(src, s, int(pos.max()) + 1) for s, (src, pos) in enumerate(zip(stream.sources, positions))]
    assert sorted(named[s][p] for s, pos in enumerate(positions) for p in pos) == sorted(got)

    c = tmp_path / "c"
    write_shards(str(c), sizes=(30, 30, 30))
    shard = c / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    (stream,) = _streams(str(c), tok, 1, 1, mb=4, shuffle_buffer=8)
    got = keys(take(stream, 15))
    cursor, plan = stream.state_dict()["cursors"][0], stream.plan
    (pos,) = consumed(fresh_spec(plan, 1, 0), plan, 0, cursor["raw"], cursor["bufsize"])
    named = _position_keys(stream.sources[0], 0, int(pos.max()) + 1)
    assert sorted(named[p] for p in pos if named[p] is not None) == sorted(got)
    assert cursor["raw"] == len(pos) > len(got)  # the lost positions were consumed as placeholders


def test_an_older_stream_state_restarts_at_the_next_epoch_with_a_message(tmp_path, tok, caplog):
    write_shards(str(tmp_path), sizes=SIZES)
    first = _streams(str(tmp_path), tok, 2, 1)
    take(first[0], 3)
    old = dict(first[0].state_dict(), version=2)
    (other,) = _streams(str(tmp_path), tok, 1, 1)
    with caplog.at_level(logging.WARNING, logger="unimlip_train.data.loader"):
        other.resume(lambda r: old, 2)
    assert "loader state version 2 -> 3" in caplog.text and "restarts at the beginning of epoch 1" in caplog.text
    assert other.epoch == 1 and other.resharded is None


def test_a_view_names_its_recut_by_positions_only():
    plan = PlanFacts((100,), (1.0,), 0, False)
    layout = {"world_size": 1, "workers": 2, "seed": 0, "plan": 1, "micro_batch_size": 4, "steps_per_epoch": 24}
    cursor = {"epoch": 0, "raw": 9, "taken": 8, "bufsize": 10}
    a = StreamView({"layout": layout, "units": [dict(cursor, skips={})] * 2, "delivered": [4]}, plan)
    b = StreamView({"layout": layout, "units": [dict(cursor, skips={"by_shard": {"x": 1}, "read": 9})] * 2,
                    "delivered": [4]}, plan)
    assert a.digest() == b.digest() and a.share(0, 3, 1) == b.share(0, 3, 1)
    assert a.remaining(0) == 100 - 2 * 9
