"""``data.augment``: the default albumentations list reproduces the hand-written views bit for bit; other lists
change views deterministically per sample; bad lists are config errors naming the entry (exit 2)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import albumentations as A
import cv2
import numpy as np
import pytest
import yaml

from augment_golden import GOLDEN, views_digests
from conftest import PNEUMONIAMNIST_NPZ, REPO
from unimlip_train.config.load import config_from_dict, load_config
from unimlip_train.config.origins import ConfigError
from unimlip_train.config.schema import Config, default_augment
from unimlip_train.data.augment import GeneratorRandom, TrainAugment, check_augment
from unimlip_train.data.medical_transforms import MedicalCLAHE, _uniform


def test_default_list_reproduces_the_hand_written_views_bit_for_bit():
    """Against digests the hand-written pipeline wrote before the list existed (tests/augment_golden.py): real
    PneumoniaMNIST, radiograph, CT and ultrasound images; 8 and 16 bits, RGB; 12 seeds; two views per seed and
    the generator's next draw."""
    expected = json.loads(GOLDEN.read_text())["views"]
    got = views_digests(TrainAugment)
    assert got.keys() == expected.keys()
    differing = {case: [s for s in expected[case] if got[case][s] != expected[case][s]] for case in expected}
    assert not any(differing.values()), differing


def _views(augment_list, image, seeds, size=64):
    cfg = Config().data
    cfg.image_size, cfg.augment = size, augment_list
    augment = TrainAugment(cfg)
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        out.append((augment(image, rng), augment(image, rng)))
    return out


def _real_image() -> np.ndarray:
    return np.load(PNEUMONIAMNIST_NPZ)["train_images"][200]  # a pneumonia case


def test_an_appended_flip_mirrors_the_default_view_when_drawn_and_is_seeded_per_sample():
    """A flip appended to the list takes one more draw after the default steps: the first view of each seed is
    the default view or its mirror image (about half of each), the same again for the same seed."""
    image, seeds = _real_image(), range(24)
    default = _views(default_augment(), image, seeds)
    flipped = _views(default_augment() + [{"name": "HorizontalFlip", "p": 0.5}], image, seeds)
    again = _views(default_augment() + [{"name": "HorizontalFlip", "p": 0.5}], image, seeds)
    mirrored = 0
    for (plain, _), (view, _), (same, _) in zip(default, flipped, again):
        assert np.array_equal(view, same)
        if np.array_equal(view, plain[:, ::-1]):
            mirrored += 1
        else:
            assert np.array_equal(view, plain)
    assert 6 <= mirrored <= 18


def test_an_appended_clahe_equalises_the_default_view_with_opencv():
    """albumentations' own CLAHE at the end (p=1, clip limit 3): each first view is OpenCV's CLAHE of the default
    view, computed here independently."""
    image, seeds = _real_image(), range(6)
    default = _views(default_augment(), image, seeds)
    equalised = _views(default_augment() + [{"name": "CLAHE", "clip_limit": [3, 3], "p": 1.0}], image, seeds)
    reference = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8))
    for (plain, _), (view, _) in zip(default, equalised):
        assert np.array_equal(view, reference.apply(plain))
        assert not np.array_equal(view, plain)


def test_medical_clahe_is_albumentations_clahe_on_8_bit_images():
    """The project's CLAHE differs from albumentations' only on float (16-bit source) images."""
    rng = np.random.default_rng(0)
    images = [_real_image(), np.stack([_real_image(), _real_image() // 2, _real_image() // 3], -1),
              rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)]
    for image in images:
        for seed in range(5):
            ours, theirs = MedicalCLAHE(clip_limit=(1, 4), p=0.5), A.CLAHE(clip_limit=(1, 4), p=0.5)
            ours.set_random_state(np.random.default_rng(seed), GeneratorRandom(np.random.default_rng(seed)))
            theirs.set_random_state(np.random.default_rng(seed), GeneratorRandom(np.random.default_rng(seed)))
            assert np.array_equal(ours(image=image)["image"], theirs(image=image)["image"])


def test_generator_random_draws_what_numpy_draws():
    """albumentations' uniform draws (Python's formula over ``random()``) and the crop's fast ``_uniform`` equal
    numpy's ``uniform``, float for float."""
    ours, numpy, fast = GeneratorRandom(np.random.default_rng(3)), np.random.default_rng(3), np.random.default_rng(3)
    for low, high in [(0.8, 1.2), (-0.2, 0.2), (1.0, 2.0), (0.01, 0.04), (0, 97.3), (-10.0, 10.0)] * 200:
        expected = numpy.uniform(low, high)
        assert ours.uniform(low, high) == expected == _uniform(fast, low, high)
    ours.rng, again = np.random.default_rng(4), GeneratorRandom(np.random.default_rng(4))
    assert [ours.randint(0, 9) for _ in range(50)] == [again.randint(0, 9) for _ in range(50)]  # integers too


@pytest.mark.parametrize("augment, names", [
    ("[{name: NoSuchTransform}]", r"data\.augment\[0\] .*unknown transform 'NoSuchTransform'"),
    ("[{name: MedicalCropAffine}, {name: CLAHE, clip_limit: high}]", r"data\.augment\[1\] .*clip_limit"),
    ("[{name: MedicalCropAffine, scale: [0.5, 2]}]", r"data\.augment\[0\] .*scale.*<= 1"),
    ("[{name: MedicalCropAffine}, {name: GaussianBlur, radius: 3}]", r"data\.augment\[1\] .*'radius' .*not valid"),
    ("[{name: MedicalCropAffine}, {name: OneOf, transforms: [{name: CLAHE}, {name: Blurr}]}]",
     r"data\.augment\[1\]\.transforms\[1\] .*unknown transform 'Blurr'"),
    ("[{name: MedicalCropAffine}, {name: Normalize}]", r"data\.augment\[1\] .*Normalize is not allowed"),
    ("[{name: MedicalCropAffine, size: 96}]", r"data\.augment\[0\] .*size is data\.image_size"),
    ("[{name: __class__}]", r"data\.augment\[0\] .*unknown transform '__class__'"),
    ("[{p: 0.5}]", r"data\.augment\[0\] .*expected a mapping with a 'name'"),
    ("[{name: CLAHE}]", r"data\.augment made a uint8 view of shape \(74, 74\).*64 x 64"),
    ("{min_scale: 0.3, crop_p: 1}", r"key 'data\.augment': unknown key\(s\) crop_p of its former mapping form"),
])
def test_a_bad_list_is_a_config_error_naming_the_entry(augment, names):
    with pytest.raises(ConfigError, match=r"^command line: " + names):
        load_config(None, [f"data.augment={augment}", "data.image_size=64"], resolve=check_augment)


def test_the_former_mapping_still_loads_as_the_list_it_stands_for(tmp_path, caplog):
    """Configs, run dirs and checkpoints written before the list (``min_scale`` ... ``hflip_p``) keep loading: the
    mapping's defaults are the default list; each key lands on the argument that implemented it."""
    assert config_from_dict({"data": {"augment": {}}}).data.augment == default_augment()
    cfg = load_config(None, ["data.augment={min_scale: 0.3, rotate_degrees: 5, hflip_p: 0.5, noise_p: 0}"])
    expected = default_augment()
    expected[0].update(scale=[0.3, 1.0], rotate=5, hflip_p=0.5)
    expected[4]["p"] = 0
    assert cfg.data.augment == expected
    assert "former mapping form" in caplog.text and "command line" in caplog.text


def test_a_list_from_a_file_and_the_shipped_config_load(tmp_path):
    """A config file replaces the whole list (lists are not merged with the base); the shipped config that
    writes the list out equals the default, so it documents the default faithfully."""
    path = tmp_path / "flip.yaml"
    path.write_text(yaml.safe_dump({"extends": str(REPO / "configs" / "tiny_cpu.yaml"), "data": {"augment": [
        {"name": "MedicalCropAffine", "hflip_p": 0.5}, {"name": "OneOf", "p": 0.5, "transforms": [
            {"name": "CLAHE", "clip_limit": [1, 2]}, {"name": "Sharpen", "alpha": [0.1, 0.2]}]}]}}))
    cfg = load_config(str(path), resolve=check_augment)
    assert [e["name"] for e in cfg.data.augment] == ["MedicalCropAffine", "OneOf"]
    image = _real_image()
    first = _views(cfg.data.augment, image, range(4), cfg.data.image_size)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, _views(cfg.data.augment, image, range(4),
                                                                          cfg.data.image_size)))
    shipped = yaml.safe_load((REPO / "configs" / "vitb16_biomedbert.yaml").read_text())
    assert shipped["data"]["augment"] == default_augment()


def test_docs_show_the_default_list():
    """docs/training.md's YAML block under "Augmentation" is the default, entry for entry."""
    text = (REPO / "docs" / "training.md").read_text()
    block = re.search(r"## Augmentation.*?```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(block) == {"data": {"augment": default_augment()}}


def test_training_start_and_print_config_exit_2_naming_the_entry(tmp_path):
    """One real command line each: ``--print-config`` and a training start (which fails before any process
    group or run dir)."""
    bad = "data.augment=[{name: MedicalCropAffine}, {name: RandomGama, p: 0.5}]"
    for extra in (["--print-config"], ["--run-dir", str(tmp_path / "run")]):
        proc = subprocess.run([sys.executable, "-m", "unimlip_train.cli.train", "--config",
                               str(REPO / "configs" / "tiny_cpu.yaml"), bad, *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "config error" in proc.stderr and "data.augment[1]" in proc.stderr
        assert "unknown transform 'RandomGama'" in proc.stderr and "did you mean RandomGamma" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_importing_the_loader_never_asks_the_package_index(tmp_path):
    """albumentations asks the package index for a newer version on import unless told not to; the project tells
    it (nothing downloads at run time). Real imports in fresh interpreters, any name lookup or connection
    recorded instead of made; the control imports albumentations first, before the project can tell it."""
    def network_use(first_import: str) -> bool:
        marker = tmp_path / first_import
        probe = (
            "import pathlib, socket\n"
            "def record(*args, **kwargs):\n"
            f"    pathlib.Path({str(marker)!r}).write_text(repr(args))\n"
            "    raise OSError('offline')\n"
            "socket.getaddrinfo = socket.create_connection = socket.socket.connect = record\n"
            f"import {first_import}\n"
            "import unimlip_train.data.loader\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
        subprocess.run([sys.executable, "-c", probe], check=True, env=env, timeout=300)
        return marker.exists()

    assert not network_use("unimlip_train.data")
    assert network_use("albumentations")  # the probe does see the version check
