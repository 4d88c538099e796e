"""Image decoding and medical-tailored augmentation (albumentations), plus the deterministic eval transform.

Why this shape: radiographs are grayscale and laterality matters, so there is no colour jitter and no
horizontal flip by default; crops are mild (fine findings must survive) and intensity changes mimic
acquisition differences (CLAHE, gamma, contrast, light blur/noise). For speed, JPEGs are decoded at a
reduced DCT scale when the training size is far below the stored size (``Image.draft``) and every image
is resized once, to a little above the training size, before any augmentation runs.
"""
from __future__ import annotations

import io
import os
import random

import cv2
import numpy as np
import torch
from PIL import Image

from unimlip_train.config import DataConfig

# CLIP's normalisation constants: the default for a random-init tower (a pretrained one brings its own, data.mean/std).
MEAN = {1: (0.48145466,), 3: (0.48145466, 0.4578275, 0.40821073)}
STD = {1: (0.26862954,), 3: (0.26862954, 0.26130258, 0.27577711)}


def normalisation(cfg: DataConfig) -> tuple[tuple, tuple]:
    """Per-channel (mean, std): ``data.mean`` / ``data.std`` when set, else CLIP's constants."""
    if cfg.mean:
        return tuple(cfg.mean), tuple(cfg.std)
    return MEAN[cfg.in_chans], STD[cfg.in_chans]

#: Images are pre-resized so their short side is about this factor times the training size: the random
#: crop and everything after it then works at low resolution.
PRERESIZE_FACTOR = 1.15
#: Probability of the small rotate/shift/scale (Affine); its ranges come from the config.
AFFINE_P = 0.8

cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads only oversubscribe them


def decode_image(data: bytes, in_chans: int, target: int) -> np.ndarray:
    """Decode JPEG/PNG bytes (nothing else) to HxW (grayscale, uint8 or uint16) or HxWx3 uint8 (colour, when in_chans=3).

    The short side is brought down to about ``PRERESIZE_FACTOR * target`` (never enlarged).
    """
    im = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))  # no other PIL plugin (EPS runs Ghostscript)
    keep_colour = in_chans == 3 and im.mode not in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")
    if im.format == "JPEG":
        im.draft("RGB" if keep_colour else "L", (target, target))
    if im.mode.startswith("I"):  # 16-bit PNG (or 32-bit integer): keep the full range
        arr = np.asarray(im)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
    else:
        arr = np.asarray(im.convert("RGB" if keep_colour else "L"))
    short = min(arr.shape[:2])
    wanted = round(PRERESIZE_FACTOR * target)
    if short > wanted:
        h, w = arr.shape[:2]
        size = (max(1, round(w * wanted / short)), max(1, round(h * wanted / short)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    return arr


def _as_float_if_16bit(arr: np.ndarray) -> np.ndarray:
    """albumentations works on uint8 or float32: 16-bit images go to float32 in [0, 1], losing nothing."""
    return arr.astype(np.float32) / 65535.0 if arr.dtype == np.uint16 else arr


class TrainAugment:
    """One random medical view per call; randomness comes only from the generators passed in."""

    def __init__(self, cfg: DataConfig):
        # Without this, importing albumentations asks the package registry for a newer version (a 2 s
        # network call per process, and a hang risk on offline cluster nodes).
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import albumentations as A

        aug = cfg.augment
        size = (cfg.image_size, cfg.image_size)
        ops = [  # crop first: every later op, the rotation included, then runs at the output size
            A.RandomResizedCrop(size=size, scale=(aug.min_scale, aug.max_scale), ratio=(3 / 4, 4 / 3)),
            A.Affine(rotate=(-aug.rotate_degrees, aug.rotate_degrees),
                     translate_percent=(-aug.shift_fraction, aug.shift_fraction),
                     scale=(0.95, 1.05), border_mode=cv2.BORDER_CONSTANT, fill=0, p=AFFINE_P),
            A.HorizontalFlip(p=aug.hflip_p),
            A.CLAHE(clip_limit=(1.0, 2.0), tile_grid_size=(8, 8), p=aug.clahe_p),
            A.RandomGamma(gamma_limit=(80, 120), p=aug.gamma_p),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.2, p=aug.contrast_p),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.0), p=aug.blur_p),
            A.GaussNoise(std_range=(0.01, 0.04), p=aug.noise_p),
        ]
        self.compose = A.Compose([op for op in ops if op.p > 0])

    def __call__(self, image: np.ndarray, rng: np.random.Generator, py_rng: random.Random) -> np.ndarray:
        self.compose.set_random_state(rng, py_rng)
        return self.compose(image=_as_float_if_16bit(image))["image"]


class EvalTransform:
    """Deterministic: resize the short side to the training size, then centre-crop a square."""

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _as_float_if_16bit(image)
        h, w = image.shape[:2]
        scale = self.size / min(h, w)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (nw, nh) != (w, h):
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            image = cv2.resize(image, (nw, nh), interpolation=interp)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return image[top:top + self.size, left:left + self.size]


def to_tensor(images: list, in_chans: int, mean: tuple | None = None, std: tuple | None = None) -> torch.Tensor:
    """Stack augmented HxW / HxWx3 arrays (uint8 or float32 in [0, 1]) into a normalised float32 BxCxHxW.

    One stack and one fused scale-and-shift for the whole batch; grayscale broadcasts to 3 channels.
    ``mean`` / ``std`` default to CLIP's constants (see ``normalisation``).
    """
    if any(im.ndim == 3 for im in images):
        images = [np.broadcast_to(im[..., None], im.shape + (3,)) if im.ndim == 2 else im for im in images]
    if all(im.dtype == np.uint8 for im in images):
        batch, scale = torch.from_numpy(np.stack(images)), 1.0 / 255.0
    else:
        batch = torch.from_numpy(np.stack([im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else im
                                           for im in images]))
        scale = 1.0
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    std = torch.tensor(std or STD[in_chans]).view(1, in_chans, 1, 1)
    mean = torch.tensor(mean or MEAN[in_chans]).view(1, in_chans, 1, 1)
    if batch.shape[1] == in_chans:
        return batch.float().mul_(scale / std).sub_(mean / std).contiguous()
    return batch.float() * (scale / std) - mean / std  # 1 -> 3 channels by broadcasting
