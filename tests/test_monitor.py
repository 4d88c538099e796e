"""Telemetry beyond scalars: TensorBoard pictures read back from the event files, retrieval examples against a
naive ranking, and the optional Weights & Biases mirror in offline mode, read back from its run files."""
from __future__ import annotations

import json
import struct
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from unimlip_train.config.load import load_config
from unimlip_train.config.origins import ConfigError
from unimlip_train.data.transforms import to_tensor
from unimlip_train.engine.monitor import EXAMPLES_TAG, VIEWS_TAG, WANDB_RUN_ID_FILE, Monitor
from unimlip_train.eval.embed import EmbeddedSet
from unimlip_train.eval.examples import retrieval_examples

REPO = Path(__file__).resolve().parent.parent


def _events(run_dir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(run_dir / "tb"), size_guidance={ea.IMAGES: 0, ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def _png(event) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.mark.parametrize("chans, stats", [(1, None), (3, None), (3, ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))])
def test_view_pairs_grid_reads_back_as_the_augmented_pixels(tmp_path, chans, stats):
    """Pixels normalised with CLIP's constants, or with a pretrained tower's own (data.mean / data.std)."""
    rng = np.random.default_rng(chans)
    shape = (5, 8, 8) + ((3,) if chans == 3 else ())
    views = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]  # what augmentation produced
    batch = {"image": to_tensor(list(views[0]), chans, *(stats or ())),
             "image_view2": to_tensor(list(views[1]), chans, *(stats or ()))}
    monitor = Monitor(str(tmp_path), True, total_steps=10, normalisation=stats)
    monitor.log_views(7, batch, max_rows=4)
    monitor.close()

    (event,) = _events(tmp_path).Images(VIEWS_TAG)
    grid, pad = _png(event), 2
    assert event.step == 7 and grid.shape == (pad + 4 * (8 + pad), pad + 2 * (8 + pad), 3)
    for row in range(4):  # sample 4 is beyond max_rows
        for col in range(2):
            y, x = pad + row * (8 + pad), pad + col * (8 + pad)
            expected = views[col][row] if chans == 3 else np.repeat(views[col][row][..., None], 3, axis=2)
            np.testing.assert_array_equal(grid[y:y + 8, x:x + 8], expected)


def test_view_grid_without_a_second_view_shows_one_column(tmp_path):
    pixels = np.full((2, 6, 6), 200, dtype=np.uint8)
    monitor = Monitor(str(tmp_path), True, total_steps=1)
    monitor.log_views(0, {"image": to_tensor(list(pixels), 1)})
    monitor.close()
    grid = _png(_events(tmp_path).Images(VIEWS_TAG)[0])
    assert grid.shape == (2 + 2 * 8, 2 + 8, 3) and (grid[2:8, 2:8] == 200).all()


def _embedded_set() -> EmbeddedSet:
    """Six samples, random embeddings; reports 1 and 4 are the same report up to case and spacing."""
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    texts = ["clear lungs.", "small left effusion.", "cardiomegaly.", "right lower lobe opacity.",
             "Small left  effusion.", "no acute disease | stable."]
    return EmbeddedSet([f"k{i}" for i in range(6)], image, text, texts, [[] for _ in range(6)])


def _naive_top(emb: EmbeddedSet, i: int, k: int) -> list:
    """Reports sorted by cosine with image i, correct = same report after whitespace/case normalisation."""
    same = " ".join(emb.texts[i].split()).casefold()
    scored = sorted(((float(emb.image[i] @ emb.text[j]), j) for j in range(len(emb.keys))), reverse=True)[:k]
    return [(emb.texts[j], s, " ".join(emb.texts[j].split()).casefold() == same) for s, j in scored]


def test_retrieval_examples_match_a_naive_ranking_and_read_back(tmp_path):
    emb = _embedded_set()
    images = {f"k{i}": torch.randn(1, 4, 4) for i in (1, 0, 5)}
    images["not-in-set"] = torch.randn(1, 4, 4)
    examples = retrieval_examples(emb, images, k=3)
    assert [e.key for e in examples] == ["k1", "k0", "k5"]
    hits = []
    for e in examples:
        i = int(e.key[1:])
        naive = _naive_top(emb, i, 3)
        assert [(t, c) for t, _, c in e.top] == [(t, c) for t, _, c in naive]
        assert [s for _, s, _ in e.top] == pytest.approx([s for _, s, _ in naive], abs=1e-6)
        assert e.report == emb.texts[i] and e.hit == any(c for _, _, c in naive)
        hits.append(e.hit)
    # A model that ranks the true report first makes every example a hit, the duplicate included.
    perfect = EmbeddedSet(emb.keys, emb.image, emb.image.clone(), emb.texts, emb.labels)
    assert all(e.hit for e in retrieval_examples(perfect, {"k1": images["k1"], "k4": images["k0"]}, k=1))

    monitor = Monitor(str(tmp_path), True, total_steps=10)
    monitor.log_retrieval_examples(4, examples)
    monitor.close()
    acc = _events(tmp_path)
    for i, e in enumerate(examples):
        (picture,) = acc.Images(f"{EXAMPLES_TAG}/{i}")
        expected = np.clip(np.round((e.image[0].numpy() * 0.26862954 + 0.48145466) * 255), 0, 255)
        assert picture.step == 4
        np.testing.assert_array_equal(_png(picture)[..., 0], expected.astype(np.uint8))
        (text_event,) = acc.Tensors(f"{EXAMPLES_TAG}/{i}/text_summary")
        text = text_event.tensor_proto.string_val[0].decode()
        assert f"true report: {e.report}" in text
        assert f"among the top 3: **{'yes' if hits[i] else 'no'}**" in text
        for rank, (report, _, correct) in enumerate(e.top, start=1):
            assert f"| {rank} |" in text and report.replace("|", "/") in text


def test_validate_with_examples_returns_rank0s_first_images(tmp_path):
    """Through the real eval loader: the examples are the first validation images, with their embeddings'
    top-3, and the metrics are exactly those of ``validate``."""
    from data_prep.cli import main as shard_main
    from unimlip_train.data.eval_loader import build_eval_loader
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.eval.embed import embed_split
    from unimlip_train.eval.validate import validate, validate_with_examples
    from unimlip_train.models.build import build_model

    shards = tmp_path / "shards"
    assert shard_main(["synthetic", "--n", "24", "--image-size", "32", "--max-size", "32", "--val-fraction", "0.5",
                       "--out", str(shards), "--workers", "1", "--no-progress"]) == 0
    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"),
                      [f"data.train={shards}", f"data.val={shards}", "data.image_size=32", "data.num_workers=0",
                       "train.micro_batch_size=4"])
    tok = load_tokenizer("")
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    metrics, examples = validate_with_examples(model, cfg, tok, 0, 1, num_examples=3)
    assert metrics == validate(model, cfg, tok, 0, 1)
    first = next(iter(build_eval_loader(cfg, str(shards), tok, 4, 0, 1, split="val")))
    assert [e.key for e in examples] == first["key"][:3]
    emb = embed_split(model, cfg, tok, str(shards), "val", 0, 1, batch_size=4)
    for e, image in zip(examples, first["image"]):
        assert torch.equal(e.image, image)
        naive = _naive_top(emb, emb.keys.index(e.key), 3)
        assert [t for t, _, _ in e.top] == [t for t, _, _ in naive]


# ------------------------------------------------------------------------------------ Weights & Biases


def _wandb_records(path: Path) -> list:
    """Records of a W&B offline run file (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, partial = path.read_bytes(), 7, 32768, [], b""  # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, or last piece of a split record
            record = pb.Record()
            record.ParseFromString(partial + chunk)
            records.append(record)
            partial = b""
        elif kind in (2, 3):  # first / middle piece
            partial += chunk
    return records


def _history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_is_continued_by_a_resumed_job(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is pinned in requirements-test.txt")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    settings = {"project": "unimlip-test", "name": "tiny", "tags": ["ci"]}
    first = Monitor(str(tmp_path), True, total_steps=4, wandb_settings=settings, run_config={"seed": 7})
    for step in (1, 2, 3):
        first.log_train(step, {"loss": 1.0 / step, "itc": 0.5})
    first.log_val(2, {"i2t_R@1": 12.5})
    first.close()
    # A requeued job resumed from a step-2 checkpoint: step 3 again, then 4.
    resumed = Monitor(str(tmp_path), True, total_steps=4, purge_step=3, wandb_settings=settings,
                      run_config={"seed": 7})
    for step in (3, 4):
        resumed.log_train(step, {"loss": 10.0 + step, "itc": 0.25})
    resumed.close()
    wandb.teardown()  # the W&B service writes the run files asynchronously: stop it so they are complete

    run_id = (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()
    # one offline run folder per job (W&B appends '-1' to a name taken in the same second), both of this run id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert [sorted(p.name for p in r.glob("*.wandb")) for r in runs] == [[f"run-{run_id}.wandb"]] * 2
    histories = []
    for run in runs:
        records = _wandb_records(run / f"run-{run_id}.wandb")
        (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run_record.run_id, run_record.project, run_record.display_name) == (run_id, "unimlip-test", "tiny")
        assert list(run_record.tags) == ["ci"]
        config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
        assert config["seed"] == 7
        histories.append(_history(records))
    assert [(h["step"], h["train/loss"], h["train/itc"]) for h in histories[0] if "train/loss" in h] == \
        [(1, 1.0, 0.5), (2, 0.5, 0.5), (3, pytest.approx(1 / 3), 0.5)]
    assert [(h["step"], h["val/i2t_R@1"]) for h in histories[0] if "val/i2t_R@1" in h] == [(2, 12.5)]
    assert [(h["step"], h["train/loss"]) for h in histories[1] if "train/loss" in h] == [(3, 13.0), (4, 14.0)]


def test_wandb_is_never_required(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were not installed
    monitor = Monitor(str(tmp_path / "plain"), True, total_steps=1)  # no monitor.wandb: works without it
    monitor.log_train(1, {"loss": 1.0})
    monitor.close()
    for enabled in (True, False):  # every rank fails alike, with the fix in the message
        with pytest.raises(RuntimeError, match=r"monitor\.wandb is set but the 'wandb' package is not installed"):
            Monitor(str(tmp_path / "wb"), enabled, total_steps=1, wandb_settings={"project": "p"})


def test_wandb_settings_are_checked_by_key(tmp_path):
    cfg = load_config(None, ["monitor.wandb={project: p, entity: e, tags: [a]}"])
    assert cfg.monitor.wandb == {"project": "p", "entity": "e", "tags": ["a"]}
    with pytest.raises(ConfigError, match=r"key 'monitor\.wandb\.resume': unknown Weights & Biases setting"):
        load_config(None, ["monitor.wandb={project: p, resume: must}"])
