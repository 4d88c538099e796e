"""Image decoding and medical-tailored augmentation, plus the deterministic eval transform.

Why this shape: radiographs are grayscale and laterality matters, so there is no colour jitter and no
horizontal flip by default; crops are mild (fine findings must survive) and intensity changes mimic
acquisition differences (CLAHE, gamma, contrast, light blur/noise). For speed, JPEGs are decoded at a
reduced DCT scale when the training size is far below the stored size (``Image.draft``) and every image
is resized once, to a little above the training size, before any augmentation runs.

The training view is built in as few passes as possible, since two of them are made per sample: the random
resized crop, the small rotation / shift / scale and the optional flip are composed into one affine matrix and
applied by a single ``cv2.warpAffine`` from the decoded image to the output size (no intermediate crop or
resize); gamma and brightness/contrast become one lookup table on 8-bit images; Gaussian noise is a randomly
placed window of a noise field drawn once per worker. The parameters and their ranges are those of the
albumentations pipeline this replaces (RandomResizedCrop, Affine, HorizontalFlip, CLAHE, RandomGamma,
RandomBrightnessContrast, GaussianBlur, GaussNoise), drawn from the generator passed in.
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
#: Probability of the small rotate/shift/scale (Affine); its ranges come from the config.
AFFINE_P = 0.8

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


def _as_float_if_16bit(arr: np.ndarray) -> np.ndarray:
    """The augmentation works on uint8 or float32: 16-bit images go to float32 in [0, 1], losing nothing."""
    return arr.astype(np.float32) / 65535.0 if arr.dtype == np.uint16 else arr


class TrainAugment:
    """One random medical view per call; randomness comes only from the generator passed in."""

    _NOISE_FIELD = 512  # side of the per-worker noise field that GaussNoise windows are cut from

    def __init__(self, cfg: DataConfig):
        self.size, self.aug = cfg.image_size, cfg.augment
        field = max(self._NOISE_FIELD, 2 * cfg.image_size)
        self.noise = np.random.default_rng(0x6A055).standard_normal((field, field), dtype=np.float32)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``image`` HxW / HxWx3, uint8 or uint16; returns size x size uint8 (float32 in [0, 1] for uint16)."""
        image = _as_float_if_16bit(image)
        matrix, moved = self._geometry(image.shape[:2], rng)
        # Black fill where rotation / shift / shrinking uncovers the output (as a scanner would); otherwise
        # the crop's edge pixels are replicated, so upsampling does not blend black into the first row.
        border = cv2.BORDER_CONSTANT if moved else cv2.BORDER_REPLICATE
        view = cv2.warpAffine(image, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=border,
                              borderValue=0)
        if image.ndim == 3 and view.ndim == 2:  # OpenCV drops a single channel axis
            view = view[..., None]
        return self._intensity(view, rng)

    def _geometry(self, shape: tuple, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """Source -> output 2x3 matrix (random resized crop, then with p=AFFINE_P rotate/shift/scale, then
        flip), and whether the rotate/shift/scale step was drawn."""
        h, w = shape
        aug, size = self.aug, self.size
        crop = None
        for _ in range(10):  # torchvision's RandomResizedCrop sampling
            area = h * w * rng.uniform(aug.min_scale, aug.max_scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
            if cw <= w and ch <= h:
                crop = (rng.uniform(0, w - cw), rng.uniform(0, h - ch), cw, ch)
                break
        if crop is None:  # fallback: the largest centred crop within the ratio range
            cw, ch = (min(w, h * 4 / 3), h) if w / h > 4 / 3 else (w, min(h, w * 4 / 3))
            crop = ((w - cw) / 2, (h - ch) / 2, cw, ch)
        x0, y0, cw, ch = crop
        sx, sy = size / cw, size / ch  # pixel centres: u = (x + 0.5 - x0) * sx - 0.5
        matrix = (sx, 0.0, (0.5 - x0) * sx - 0.5, 0.0, sy, (0.5 - y0) * sy - 0.5)
        moved = rng.random() < AFFINE_P
        if moved:  # cv2.getRotationMatrix2D about the output centre, then the shift
            angle = np.deg2rad(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees))
            tx, ty = rng.uniform(-aug.shift_fraction, aug.shift_fraction, 2) * size
            scale, centre = rng.uniform(0.95, 1.05), (size - 1) / 2
            alpha, beta = scale * np.cos(angle), scale * np.sin(angle)
            matrix = _compose((alpha, beta, (1 - alpha) * centre - beta * centre + tx,
                               -beta, alpha, beta * centre + (1 - alpha) * centre + ty), matrix)
        if rng.random() < aug.hflip_p:
            matrix = _compose((-1.0, 0.0, size - 1.0, 0.0, 1.0, 0.0), matrix)
        return np.array(matrix, dtype=np.float64).reshape(2, 3), moved

    def _intensity(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        aug = self.aug
        if rng.random() < aug.clahe_p:
            view = _clahe(view, rng.uniform(1.0, 2.0))
        gamma = rng.uniform(0.8, 1.2) if rng.random() < aug.gamma_p else None
        contrast = (1 + rng.uniform(-0.2, 0.2), rng.uniform(-0.1, 0.1)) if rng.random() < aug.contrast_p else None
        if gamma is not None or contrast is not None:
            view = _tone(view, gamma, contrast)
        if rng.random() < aug.blur_p:
            k = int(rng.choice([3, 5]))
            view = cv2.GaussianBlur(view, (k, k), rng.uniform(0.1, 1.0))
        if rng.random() < aug.noise_p:
            std = rng.uniform(0.01, 0.04) * (255.0 if view.dtype == np.uint8 else 1.0)
            top, left = rng.integers(0, self.noise.shape[0] - self.size + 1, 2)
            noise = self.noise[top:top + self.size, left:left + self.size]
            noisy = view.astype(np.float32) + std * (noise[..., None] if view.ndim == 3 else noise)
            view = np.clip(noisy, 0, 255).astype(np.uint8) if view.dtype == np.uint8 else np.clip(noisy, 0, 1)
        return view


def _compose(outer: tuple, inner: tuple) -> tuple:
    """The 2x3 affine ``outer`` after ``inner``, both as row-major 6-tuples (plain floats: these are tiny)."""
    a, b, c, d, e, f = outer
    p, q, r, s, t, u = inner
    return (a * p + b * s, a * q + b * t, a * r + b * u + c, d * p + e * s, d * q + e * t, d * r + e * u + f)


def _clahe(view: np.ndarray, clip: float) -> np.ndarray:
    """CLAHE (8x8 tiles) on the grey levels, or on the lightness of a colour image; float stays float."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8))
    if view.dtype != np.uint8 and view.ndim == 2:
        return clahe.apply(np.rint(view * 65535).astype(np.uint16)).astype(np.float32) / 65535
    if view.dtype != np.uint8:  # colour or HxWx1 float: through 8 bits and back
        return _clahe(np.rint(view * 255).astype(np.uint8), clip).astype(np.float32) / 255
    if view.ndim == 3 and view.shape[2] == 1:
        return clahe.apply(view[..., 0])[..., None]
    if view.ndim == 3:
        lab = cv2.cvtColor(view, cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return clahe.apply(view)


def _tone(view: np.ndarray, gamma, contrast) -> np.ndarray:
    """Gamma, then contrast (alpha) and brightness (beta, a fraction of the maximum): one LUT for 8-bit."""
    values = np.arange(256, dtype=np.float32) / 255.0 if view.dtype == np.uint8 else view
    if gamma is not None:
        values = np.power(values, gamma)
    if contrast is not None:
        values = values * contrast[0] + contrast[1]
    values = np.clip(values, 0.0, 1.0)
    if view.dtype != np.uint8:
        return values.astype(np.float32)
    return cv2.LUT(view, np.rint(values * 255).astype(np.uint8))


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
