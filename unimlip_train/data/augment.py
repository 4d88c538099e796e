"""``data.augment``: the training views' augmentation as a list of albumentations transforms, built by name.

Each entry is ``{name: <class>, ...its arguments}``; the name is looked up among the project's own transforms
(``data.medical_transforms.PROJECT_TRANSFORMS``) and then in albumentations' namespace, never evaluated.
Composition classes (``OneOf``, ``SomeOf``, ``Sequential``, ...) take their ``transforms`` as a nested list of
entries. A class that does not exist, an argument it does not take or a value its schema rejects is an error
naming the entry (``data.augment[2]``, ``data.augment[1].transforms[0]``); entry points check the list when the
config loads (``check_augment``, a ``config.Resolver``), so it is a config error (exit 2) before any process
starts.

Randomness: each view takes every draw (albumentations' ``p`` and parameters as well as the project transforms')
from the sample's own ``numpy.random.Generator``, seeded by the run seed and the sample, so views are the same on
every rank layout and after a resume. albumentations' Python-side draws (``py_random``) come from that generator
through ``GeneratorRandom``.
"""
from __future__ import annotations

import difflib
import random
import re
from typing import Any

import albumentations as A
import numpy as np
from albumentations.core.composition import BaseCompose

from unimlip_train.config.origins import ConfigError, Origins
from unimlip_train.config.schema import Config, DataConfig
from unimlip_train.data.medical_transforms import PROJECT_TRANSFORMS
from unimlip_train.data.transforms import PRERESIZE_FACTOR, as_float_if_16bit

#: albumentations classes that would break what the loader does after augmentation, and why.
REFUSED = {
    "Normalize": "the loader normalises each batch with data.mean / data.std after augmentation",
    "ToTensorV2": "the loader turns views into tensors itself",
}


class AugmentSpecError(ValueError):
    """A ``data.augment`` entry that cannot be built; the message names the entry (``data.augment[i]``)."""


class GeneratorRandom(random.Random):
    """A ``random.Random`` whose every draw comes from a numpy Generator (``rng``, set per sample): albumentations
    draws its probabilities and most parameters from ``py_random``. ``uniform(a, b)`` is then ``a + (b - a) *
    rng.random()``, the same float as ``rng.uniform(a, b)``."""

    def __init__(self, rng: np.random.Generator | None = None):
        super().__init__(0)
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def random(self) -> float:
        return self.rng.random()

    def getrandbits(self, k: int) -> int:
        return int.from_bytes(self.rng.bytes((k + 7) // 8), "little") >> (-k % 8)


def build_transforms(specs: Any, image_size: int, where: str = "data.augment") -> list:
    """The transforms of a ``data.augment`` list, in order; ``image_size`` is the ``size`` of project transforms
    that take one (``MedicalCropAffine``: its output is the model's input)."""
    if not isinstance(specs, (list, tuple)):
        raise AugmentSpecError(f"{where}: expected a list of {{name: ..., arguments}} entries, got "
                               f"{type(specs).__name__} {specs!r}")
    return [_build_one(spec, image_size, f"{where}[{i}]") for i, spec in enumerate(specs)]


def _build_one(spec: Any, image_size: int, where: str):
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise AugmentSpecError(f"{where} {spec!r}: expected a mapping with a 'name' (an albumentations class or "
                               f"one of {', '.join(PROJECT_TRANSFORMS)})")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    cls = PROJECT_TRANSFORMS.get(name) or (getattr(A, name, None) if not name.startswith("_") else None)
    if name in REFUSED:
        raise AugmentSpecError(f"{where} {spec!r}: {name} is not allowed here: {REFUSED[name]}")
    if not _is_transform(cls):
        close = difflib.get_close_matches(name, [*PROJECT_TRANSFORMS, *(n for n in dir(A) if
                                                                     _is_transform(getattr(A, n)))], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AugmentSpecError(f"{where} {spec!r}: unknown transform {name!r} (not an albumentations "
                               f"{A.__version__} transform, nor one of {', '.join(PROJECT_TRANSFORMS)}){hint}")
    if issubclass(cls, BaseCompose):
        kwargs["transforms"] = build_transforms(kwargs.get("transforms"), image_size, f"{where}.transforms")
    elif name in PROJECT_TRANSFORMS and "size" in cls.InitSchema.model_fields:
        if "size" in kwargs:
            raise AugmentSpecError(f"{where} {spec!r}: {name}'s size is data.image_size; remove 'size'")
        kwargs["size"] = image_size
    try:
        return cls(**kwargs) if issubclass(cls, BaseCompose) else cls(**kwargs, strict=True)
    except (TypeError, ValueError) as e:
        raise AugmentSpecError(f"{where} {spec!r}: {_one_line(str(e))}") from None


def _is_transform(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, (A.BasicTransform, BaseCompose))


def _one_line(message: str) -> str:
    """A pydantic validation message on one line, without its links and internal type tags."""
    message = re.sub(r"\[type=[^\]]*\]|For further information visit \S+", "", message)
    return " ".join(message.split())


class TrainAugment:
    """One random training view per call from ``data.augment``; every draw comes from the generator passed in."""

    def __init__(self, cfg: DataConfig):
        self.size, self.specs = cfg.image_size, cfg.augment
        self.transforms = build_transforms(cfg.augment, cfg.image_size)
        self.py_random = GeneratorRandom()

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``image`` HxW / HxWx3 (or HxWx1), uint8 or uint16; returns size x size uint8 (float32 in [0, 1] for
        uint16, which albumentations takes as float)."""
        self.py_random.rng = rng
        data = {"image": as_float_if_16bit(image)}
        for i, transform in enumerate(self.transforms):
            transform.set_random_state(rng, self.py_random)
            try:
                data = transform(**data)
            except Exception as e:
                raise ValueError(f"data.augment[{i}] {self.specs[i]!r} failed on a {data['image'].dtype} image of "
                                 f"shape {data['image'].shape}: {e}") from e
        view = data["image"]
        if view.shape[:2] != (self.size, self.size) or view.dtype not in (np.uint8, np.float32):
            raise ValueError(f"data.augment made a {view.dtype} view of shape {view.shape}; the model takes "
                             f"{self.size} x {self.size} (data.image_size) uint8 or float32 views: keep a crop or "
                             "resize to data.image_size (MedicalCropAffine) and no dtype change in the list")
        return view


def check_augment(cfg: Config, origins: Origins) -> None:
    """A ``config.Resolver``: build ``data.augment`` and run it once on a blank image of the decoded size, so a
    wrong name, argument or output size is a config error naming the entry and the file that set it."""
    source = origins.get("data.augment", "defaults")
    try:
        augment = TrainAugment(cfg.data)
    except AugmentSpecError as e:
        raise ConfigError(f"{source}: {e}") from None
    side = round(PRERESIZE_FACTOR * cfg.data.image_size)
    blank = np.full((side, side, 3) if cfg.data.in_chans == 3 else (side, side), 128, np.uint8)
    try:
        augment(blank, np.random.default_rng(0))
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
