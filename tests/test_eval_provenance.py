"""Evaluation protocols and provenance: a seeded random retrieval subset whose cost follows the subset, the
card in every result (and beside --out), a progress bar with a total and a rate, group-aware validation carving.

Real synthetic shards (``unimlip-shard synthetic``) and a tiny random-init model written as an export folder.
"""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import unimlip_train.eval.groups as eval_groups
from unimlip_train.eval.linear_probe import carve_validation

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from safetensors.torch import save_file

    from unimlip_train.config.load import dump_yaml, load_config
    from unimlip_train.data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer
    from unimlip_train.models.build import build_model

    root = tmp_path_factory.mktemp("provenance")
    subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "60", "--image-size", "32",
                    "--max-size", "32", "--val-fraction", "0.4", "--shard-size", "7", "--out", str(root / "shards"),
                    "--workers", "1", "--no-progress"], check=True, capture_output=True, timeout=300)
    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"), ["data.image_size=32", "data.num_workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg, load_tokenizer())
    export = root / "export"
    export.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              export / "model.safetensors", metadata={"source": "/runs/x/checkpoints/step_0000042", "step": "42"})
    (export / "config.yaml").write_text(dump_yaml(cfg))
    import shutil

    shutil.copytree(DEFAULT_TOKENIZER_DIR, export / "tokenizer")
    return {"root": root, "shards": root / "shards", "export": export}


def _tar_keys(shards: Path, split: str) -> list[str]:
    """Naive reference: sample keys straight from the tar member names."""
    keys = set()
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys |= {Path(m.name).name.split(".", 1)[0] for m in tar.getmembers()}
    return sorted(keys)


def test_retrieval_on_a_seeded_subset_embeds_only_the_subset(setup, monkeypatch, capsys):
    import unimlip_train.data.decode as decode
    from unimlip_train.eval.embed import embed_split
    from unimlip_train.eval.metrics import retrieval_metrics
    from unimlip_train.export import load_for_eval

    model, cfg, tokenizer = load_for_eval(str(setup["export"]))
    shards = str(setup["shards"])
    full = embed_split(model, cfg, tokenizer, shards, "val", 0, 1, batch_size=4)
    decoded = []
    real_decode = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
    sub = embed_split(model, cfg, tokenizer, shards, "val", 0, 1, batch_size=4, progress=True, sample=7, seed=3)
    assert len(decoded) == 7  # the others were skipped before decoding
    expected = sorted(random.Random(3).sample(_tar_keys(setup["shards"], "val"), 7))
    assert sub.keys == expected and sub.keys != full.keys[:7]
    rows = torch.tensor([full.keys.index(k) for k in expected])
    # the same samples' embeddings (batch composition changes float rounding only)
    assert torch.allclose(sub.image, full.image[rows], atol=1e-5)
    assert torch.allclose(sub.text, full.text[rows], atol=1e-5)
    assert retrieval_metrics(sub.image, sub.text, sub.texts) == pytest.approx(retrieval_metrics(
        full.image[rows], full.text[rows], [full.texts[i] for i in rows]))
    assert sub.groups == [full.groups[i] for i in rows] and all(g.startswith("synpat-") for g in sub.groups)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "embed val: 100%" in bar and "7/7" in bar and "sample/s" in bar  # a total and a rate


def test_every_result_carries_its_card_also_beside_out(setup, tmp_path):
    out = tmp_path / "res" / "retrieval.json"
    cmd = [sys.executable, "-m", "unimlip_train.cli.eval", "retrieval", "--checkpoint", str(setup["export"]),
           "--data", str(setup["shards"]), "--sample", "9", "--seed", "5", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    card = doc["card"]
    index_sha = hashlib.sha256((setup["shards"] / "index.json").read_bytes()).hexdigest()
    import yaml

    from unimlip_train import __version__
    from unimlip_train.config.load import config_from_dict

    cfg = config_from_dict(yaml.safe_load((setup["export"] / "config.yaml").read_text()))
    assert card == {"tool": "unimlip-eval retrieval", "version": __version__,
                    "checkpoint": str(setup["export"]), "step": 42,
                    "exported_from": "/runs/x/checkpoints/step_0000042", "config_hash": cfg.hash(),
                    "data": {"path": str(setup["shards"]), "index_sha256": index_sha, "splits": {"test": "val"}},
                    "samples": 9, "seed": 5}
    assert doc["num_samples"] == 9
    assert json.loads(out.read_text()) == doc
    assert json.loads((tmp_path / "res" / "card-retrieval.json").read_text()) == card
    assert "embed val: 100%" in run.stderr and "9/9" in run.stderr

    zs = subprocess.run([sys.executable, "-m", "unimlip_train.cli.eval", "zeroshot", "--checkpoint",
                         str(setup["export"]), "--data", str(setup["shards"]), "--classes", "No Finding,Opacity"],
                        capture_output=True, text=True, timeout=300)
    assert zs.returncode == 0, zs.stderr[-3000:]
    prompts = REPO / "unimlip_train" / "resources" / "prompts" / "chest_xray.yaml"
    zcard = json.loads(zs.stdout.strip().splitlines()[-1])["card"]
    assert zcard["prompts"] == {"path": str(prompts), "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()}
    assert zcard["tool"] == "unimlip-eval zeroshot" and zcard["samples"] > 0 and zcard["seed"] == 0


def test_validation_is_carved_by_whole_groups_and_label_fractions_sample_groups():
    rng = np.random.default_rng(0)
    groups = [f"p{i // 3}" for i in range(300)]  # 100 patients x 3 images
    strata = [int(g[1:]) % 3 for g in groups]  # a patient's images share its class
    fit, val = carve_validation(np.asarray(strata), 0.2, groups=groups)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(300))
    fit_groups, val_groups = {groups[i] for i in fit}, {groups[i] for i in val}
    assert not fit_groups & val_groups  # no patient on both sides
    per_class = [sum(strata[i] == c for i in val) for c in range(3)]
    assert all(15 <= n <= 24 for n in per_class), per_class  # about 20 % of each class's 34/33/33 patients
    again = eval_groups.carve_groups(strata, groups, 0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(eval_groups.carve_groups(strata, groups, 0.2, seed=1)[1], val)

    shuffled = rng.permutation(300)  # the result does not depend on the order samples arrive in
    perm_val = eval_groups.carve_groups([strata[i] for i in shuffled], [groups[i] for i in shuffled], 0.2)[1]
    assert {groups[shuffled[i]] for i in perm_val} == val_groups

    for fraction, per_stratum in ((0.01, 1), (0.1, 4), (1.0, 34)):
        idx = eval_groups.sample_groups(strata, groups, fraction, seed=7)
        chosen = {groups[i] for i in idx}
        assert len(idx) == 3 * len(chosen)  # whole patients
        counts = [len({g for g in chosen if strata[groups.index(g)] == c}) for c in range(3)]
        assert max(counts) == per_stratum and min(counts) >= 1, (fraction, counts)
    smaller, larger = (set(eval_groups.sample_groups(strata, groups, f, 7)) for f in (0.1, 0.5))
    assert smaller <= larger
