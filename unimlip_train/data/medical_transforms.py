"""The project's own albumentations transforms: what ``data.augment`` names when albumentations has no class
with the same maths (``data.augment`` builds them by name, next to albumentations' own).

Why each is ours (docs/training.md "Augmentation" has the table):
- ``MedicalCropAffine``: random resized crop, a small rotate / shift / scale and an optional flip composed into
  one affine matrix and applied by a single ``cv2.warpAffine`` from the decoded image to the output size; as
  RandomResizedCrop + Affine + HorizontalFlip it would be three resamplings per view, two views per sample.
- ``MedicalCLAHE``: albumentations' CLAHE (its class, its parameters, its maths on 8-bit images); a float
  greyscale image (a 16-bit source) is equalised at 16 bits, where albumentations goes through 8.
- ``MedicalTone``: gamma, then contrast and brightness, as one lookup table rounded once (RandomGamma and
  RandomBrightnessContrast are two tables, the first truncated to 8 bits).
- ``MedicalGaussianBlur``: ``cv2.GaussianBlur`` with a kernel size drawn from a list (3 or 5 by default);
  albumentations' GaussianBlur draws any size in a range and convolves its own kernel.
- ``MedicalGaussNoise``: Gaussian noise cut as a random window from a field drawn once per worker, instead of a
  fresh field per image (GaussNoise), which costs more than every other step of the view together.

Every random draw comes from ``self.random_generator`` (probabilities of albumentations' ``p`` from
``self.py_random``): the loader points both at the sample's own generator (``data.augment.TrainAugment``), so
the views depend only on the run seed and the sample, and the draws are those of the hand-written pipeline
this replaces, in the same order (views bit-identical: tests/test_augment_pipeline.py).
"""
from __future__ import annotations

import math
from typing import Annotated, Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import AfterValidator, Field


def _ordered(lo_bound: float | None = None, hi_bound: float | None = None, lo_open: bool = False):
    """A pydantic check of a (low, high) pair: low <= high, both within the bounds."""
    def check(pair: tuple) -> tuple:
        lo, hi = pair
        if lo > hi:
            raise ValueError(f"need low <= high, got {list(pair)}")
        if lo_bound is not None and (lo < lo_bound or (lo_open and lo == lo_bound)):
            raise ValueError(f"values must be {'>' if lo_open else '>='} {lo_bound}, got {list(pair)}")
        if hi_bound is not None and hi > hi_bound:
            raise ValueError(f"values must be <= {hi_bound}, got {list(pair)}")
        return pair
    return AfterValidator(check)


Probability = Annotated[float, Field(ge=0, le=1)]


class MedicalCropAffine(A.ImageOnlyTransform):
    """Random resized crop (torchvision's sampling: area ``scale``, aspect ``ratio``), then with ``affine_p`` a
    rotation within +-``rotate`` degrees, a shift within +-``shift`` of the side and a zoom within
    ``affine_scale`` about the output centre, then with ``hflip_p`` a horizontal flip: one warp to
    ``size`` x ``size`` (``data.image_size``), bilinear. Black fill where the rotate / shift / zoom uncovers the
    output (as a scanner would); otherwise the crop's edge pixels are replicated, so upsampling does not blend
    black into the first row."""

    class InitSchema(BaseTransformInitSchema):
        size: int = Field(ge=1)
        scale: Annotated[tuple[float, float], _ordered(0.0, 1.0, lo_open=True)]
        ratio: Annotated[tuple[float, float], _ordered(0.0, None, lo_open=True)]
        rotate: float = Field(ge=0, le=180)
        shift: float = Field(ge=0, lt=1)
        affine_scale: Annotated[tuple[float, float], _ordered(0.0, None, lo_open=True)]
        affine_p: Probability
        hflip_p: Probability

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), rotate: float = 10.0, shift: float = 0.05,
                 affine_scale: tuple[float, float] = (0.95, 1.05), affine_p: float = 0.8, hflip_p: float = 0.0,
                 p: float = 1.0):
        super().__init__(p=p)
        self.size, self.scale, self.ratio, self.rotate, self.shift = size, scale, ratio, rotate, shift
        self.affine_scale, self.affine_p, self.hflip_p = affine_scale, affine_p, hflip_p

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        matrix, moved = self._matrix(params["shape"][:2], self.random_generator)
        return {"matrix": matrix, "moved": moved}

    def apply(self, img: np.ndarray, matrix: np.ndarray, moved: bool, **params: Any) -> np.ndarray:
        border = cv2.BORDER_CONSTANT if moved else cv2.BORDER_REPLICATE
        view = cv2.warpAffine(img, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=border,
                              borderValue=0)
        return view[..., None] if img.ndim == 3 and view.ndim == 2 else view  # OpenCV drops a single channel axis

    def _matrix(self, shape: tuple, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """Source -> output 2x3 matrix, and whether the rotate / shift / zoom step was drawn."""
        h, w = shape
        size, crop, log_ratio = self.size, None, (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):  # torchvision's RandomResizedCrop sampling
            area = h * w * _uniform(rng, *self.scale)
            ratio = np.exp(_uniform(rng, *log_ratio))
            cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if cw <= w and ch <= h:
                crop = (_uniform(rng, 0, w - cw), _uniform(rng, 0, h - ch), cw, ch)
                break
        if crop is None:  # fallback: the largest centred crop within the ratio range (h / (1 / hi) and w / lo
            lo, hi = self.ratio  # round as the hand-written pipeline's h * 4 / 3 and w * 4 / 3 did)
            cw, ch = (min(w, h / (1 / hi)), h) if w / h > hi else (w, min(h, w / lo))
            crop = ((w - cw) / 2, (h - ch) / 2, cw, ch)
        x0, y0, cw, ch = crop
        sx, sy = size / cw, size / ch  # pixel centres: u = (x + 0.5 - x0) * sx - 0.5
        matrix = (sx, 0.0, (0.5 - x0) * sx - 0.5, 0.0, sy, (0.5 - y0) * sy - 0.5)
        moved = rng.random() < self.affine_p
        if moved:  # cv2.getRotationMatrix2D about the output centre, then the shift
            angle = np.deg2rad(_uniform(rng, -self.rotate, self.rotate))
            tx, ty = _uniform(rng, -self.shift, self.shift) * size, _uniform(rng, -self.shift, self.shift) * size
            zoom, centre = _uniform(rng, *self.affine_scale), (size - 1) / 2
            alpha, beta = zoom * np.cos(angle), zoom * np.sin(angle)
            matrix = _compose((alpha, beta, (1 - alpha) * centre - beta * centre + tx,
                               -beta, alpha, beta * centre + (1 - alpha) * centre + ty), matrix)
        if rng.random() < self.hflip_p:
            matrix = _compose((-1.0, 0.0, size - 1.0, 0.0, 1.0, 0.0), matrix)
        return np.array(matrix, dtype=np.float64).reshape(2, 3), moved


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """``rng.uniform(low, high)``, the same float from the same draw (numpy computes ``low + (high - low) * u``),
    at a fifth of its call overhead: a view draws about ten of them."""
    return low + (high - low) * rng.random()


def _compose(outer: tuple, inner: tuple) -> tuple:
    """The 2x3 affine ``outer`` after ``inner``, both as row-major 6-tuples (plain floats: these are tiny)."""
    a, b, c, d, e, f = outer
    p, q, r, s, t, u = inner
    return (a * p + b * s, a * q + b * t, a * r + b * u + c, d * p + e * s, d * q + e * t, d * r + e * u + f)


class MedicalCLAHE(A.CLAHE):
    """albumentations' CLAHE; a float greyscale image (a 16-bit source) is equalised at 16 bits, a float colour
    or single-channel-axis image through 8 bits, and stays float."""

    def apply(self, img: np.ndarray, clip_limit: float, **params: Any) -> np.ndarray:
        if img.dtype == np.uint8:
            return super().apply(img, clip_limit, **params)
        if img.ndim == 2:
            clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tuple(self.tile_grid_size))
            return clahe.apply(np.rint(img * 65535).astype(np.uint16)).astype(np.float32) / 65535
        return super().apply(np.rint(img * 255).astype(np.uint8), clip_limit, **params).astype(np.float32) / 255


class MedicalTone(A.ImageOnlyTransform):
    """With ``gamma_p`` a gamma in ``gamma``; with ``contrast_p`` a contrast factor 1 + ``contrast_limit`` and a
    brightness shift ``brightness_limit`` (a fraction of the maximum, as RandomBrightnessContrast); on 8-bit
    images both as one lookup table, rounded once."""

    class InitSchema(BaseTransformInitSchema):
        gamma: Annotated[tuple[float, float], _ordered(0.0, None, lo_open=True)]
        gamma_p: Probability
        contrast_limit: Annotated[tuple[float, float], _ordered(-1.0, None)]
        brightness_limit: Annotated[tuple[float, float], _ordered(-1.0, 1.0)]
        contrast_p: Probability

    def __init__(self, gamma: tuple[float, float] = (0.8, 1.2), gamma_p: float = 0.3,
                 contrast_limit: tuple[float, float] = (-0.2, 0.2), brightness_limit: tuple[float, float] = (-0.1, 0.1),
                 contrast_p: float = 0.3, p: float = 1.0):
        super().__init__(p=p)
        self.gamma, self.gamma_p, self.contrast_p = gamma, gamma_p, contrast_p
        self.contrast_limit, self.brightness_limit = contrast_limit, brightness_limit

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        gamma = _uniform(rng, *self.gamma) if rng.random() < self.gamma_p else None
        contrast = None
        if rng.random() < self.contrast_p:
            contrast = (1 + _uniform(rng, *self.contrast_limit), _uniform(rng, *self.brightness_limit))
        return {"gamma": gamma, "contrast": contrast}

    def apply(self, img: np.ndarray, gamma: float | None, contrast: tuple | None, **params: Any) -> np.ndarray:
        if gamma is None and contrast is None:
            return img
        values = np.arange(256, dtype=np.float32) / 255.0 if img.dtype == np.uint8 else img
        if gamma is not None:
            values = np.power(values, gamma)
        if contrast is not None:
            values = values * contrast[0] + contrast[1]
        values = np.clip(values, 0.0, 1.0)
        if img.dtype != np.uint8:
            return values.astype(np.float32)
        view = cv2.LUT(img, np.rint(values * 255).astype(np.uint8))
        return view[..., None] if img.ndim == 3 and view.ndim == 2 else view


class MedicalGaussianBlur(A.ImageOnlyTransform):
    """``cv2.GaussianBlur`` with a kernel side drawn from ``kernel_sizes`` and a sigma in ``sigma_limit``."""

    class InitSchema(BaseTransformInitSchema):
        kernel_sizes: Annotated[list[int], Field(min_length=1), AfterValidator(lambda ks: _odd_sizes(ks))]
        sigma_limit: Annotated[tuple[float, float], _ordered(0.0, None, lo_open=True)]

    def __init__(self, kernel_sizes: list[int] = (3, 5), sigma_limit: tuple[float, float] = (0.1, 1.0),
                 p: float = 0.1):
        super().__init__(p=p)
        self.kernel_sizes, self.sigma_limit = list(kernel_sizes), sigma_limit

    def get_params(self) -> dict[str, Any]:
        k = int(self.random_generator.choice(self.kernel_sizes))
        return {"ksize": k, "sigma": self.random_generator.uniform(*self.sigma_limit)}

    def apply(self, img: np.ndarray, ksize: int, sigma: float, **params: Any) -> np.ndarray:
        view = cv2.GaussianBlur(img, (ksize, ksize), sigma)
        return view[..., None] if img.ndim == 3 and view.ndim == 2 else view


def _odd_sizes(sizes: list) -> list:
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel sizes must be odd and positive, got {sizes}")
    return sizes


class MedicalGaussNoise(A.ImageOnlyTransform):
    """Additive Gaussian noise with a standard deviation in ``std_range`` (a fraction of the maximum, as
    GaussNoise), the same on every channel; the noise is a random window of a field drawn once per process
    (seeded, so every worker has the same field)."""

    class InitSchema(BaseTransformInitSchema):
        std_range: Annotated[tuple[float, float], _ordered(0.0, 1.0)]

    #: Smallest side of the noise field; it is at least twice the image side.
    FIELD = 512

    def __init__(self, std_range: tuple[float, float] = (0.01, 0.04), p: float = 0.1):
        super().__init__(p=p)
        self.std_range = std_range
        self._field = np.zeros((0, 0), np.float32)

    def _noise(self, side: int) -> np.ndarray:
        field = max(self.FIELD, 2 * side)
        if self._field.shape[0] != field:
            self._field = np.random.default_rng(0x6A055).standard_normal((field, field), dtype=np.float32)
        return self._field

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        noise, rng = self._noise(max(h, w)), self.random_generator
        std = rng.uniform(*self.std_range)
        top, left = rng.integers(0, noise.shape[0] - max(h, w) + 1, 2)
        return {"std": std, "window": noise[top:top + h, left:left + w]}

    def apply(self, img: np.ndarray, std: float, window: np.ndarray, **params: Any) -> np.ndarray:
        std = std * (255.0 if img.dtype == np.uint8 else 1.0)
        noisy = img.astype(np.float32) + std * (window[..., None] if img.ndim == 3 else window)
        return np.clip(noisy, 0, 255).astype(np.uint8) if img.dtype == np.uint8 else np.clip(noisy, 0, 1)


#: The names ``data.augment`` may use besides albumentations' own classes.
PROJECT_TRANSFORMS = {cls.__name__: cls for cls in (MedicalCropAffine, MedicalCLAHE, MedicalTone,
                                                    MedicalGaussianBlur, MedicalGaussNoise)}
