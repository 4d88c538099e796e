"""Image decoding, the deterministic eval transform and the batch tensor: what comes before and after the
training augmentation (``data.augment``, built in ``data.augment``).

For speed, JPEGs are decoded at a reduced DCT scale when the training size is far below the stored size
(``Image.draft``) and every image is resized once, to a little above the training size, before any augmentation
runs. 16-bit images stay 16-bit until augmentation or evaluation takes them as float32 in [0, 1].
"""
from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unimlip_train.config.schema import DataConfig
from unimlip_train.format.limits import check_pixels, header_size, jpeg_frame

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
cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads only oversubscribe them


_REDUCED = {(1, False): cv2.IMREAD_GRAYSCALE, (2, False): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, False): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, False): cv2.IMREAD_REDUCED_GRAYSCALE_8,
            (1, True): cv2.IMREAD_COLOR, (2, True): cv2.IMREAD_REDUCED_COLOR_2,
            (4, True): cv2.IMREAD_REDUCED_COLOR_4, (8, True): cv2.IMREAD_REDUCED_COLOR_8}


def _decode_jpeg(data: bytes, in_chans: int, target: int):
    """libjpeg-turbo through OpenCV at the largest DCT reduction (1/2, 1/4, 1/8) that keeps the short side at
    ``target`` or more: the entropy decoding is the same as PIL's, the rest is cheaper. None: use PIL."""
    frame = jpeg_frame(data)
    if frame is None or frame[2] not in (1, 3):
        return None
    h, w, components = frame
    factor = next((f for f in (8, 4, 2) if -(-min(h, w) // f) >= target), 1)
    colour = in_chans == 3 and components == 3
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor, colour] | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        raise ValueError("undecodable JPEG data")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if colour else arr


def decode_image(data: bytes, in_chans: int, target: int, max_pixels: int = 0) -> np.ndarray:
    """Decode JPEG/PNG bytes (nothing else) to HxW (grayscale, uint8 or uint16) or HxWx3 uint8 (colour, when in_chans=3).

    The short side is brought down to about ``PRERESIZE_FACTOR * target`` (never enlarged). An image of more
    than ``max_pixels`` (``data.max_image_pixels``; 0: no limit) is refused from its header, before decoding.
    """
    if max_pixels:
        check_pixels(*image_size(data), max_pixels, "data.max_image_pixels")
    arr = _decode_jpeg(data, in_chans, target)
    if arr is None:
        arr = _decode_pil(data, in_chans, target)
    short = min(arr.shape[:2])
    wanted = round(PRERESIZE_FACTOR * target)
    if short > wanted:
        h, w = arr.shape[:2]
        size = (max(1, round(w * wanted / short)), max(1, round(h * wanted / short)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    return arr


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of JPEG/PNG bytes from their header (PIL's lazy open when the quick parse does not know
    the layout: it too reads only the header; its own bomb warning is ours to decide, so it is silenced)."""
    size = header_size(data)
    if size is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
                    size = im.size
            except UnidentifiedImageError:
                raise ValueError("neither a readable JPEG nor PNG image") from None
    return size


def _decode_pil(data: bytes, in_chans: int, target: int) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))  # no other PIL plugin (EPS runs Ghostscript)
    except UnidentifiedImageError:
        raise ValueError("neither a readable JPEG nor PNG image") from None
    keep_colour = in_chans == 3 and im.mode not in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")
    if im.format == "JPEG":
        im.draft("RGB" if keep_colour else "L", (target, target))
    if im.mode.startswith("I"):  # 16-bit PNG (or 32-bit integer): keep the full range
        arr = np.asarray(im)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
    else:
        arr = np.asarray(im.convert("RGB" if keep_colour else "L"))
    return arr


def as_float_if_16bit(arr: np.ndarray) -> np.ndarray:
    """Augmentation and evaluation work on uint8 or float32: 16-bit images go to float32 in [0, 1], losing nothing."""
    return arr.astype(np.float32) / 65535.0 if arr.dtype == np.uint16 else arr


class EvalTransform:
    """Deterministic: resize the short side to the training size, then centre-crop a square."""

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = as_float_if_16bit(image)
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
