"""Image decode -> window -> resize -> encode -> fingerprint for the shard writer.

One function per step so the writer's worker processes and the throughput benchmark run the very same
code. 8-bit images are stored as JPEG (small shards); 16-bit sources are stored as 16-bit PNG when the
user asks to keep them (JPEG has no 16-bit mode), otherwise mapped to 8 bits.

High-bit-depth rasters (16-bit PNG/TIFF, 32-bit integer or float TIFF) carry no display window, and a 12-bit
film stored in 16 bits uses a sixteenth of the range (divided by 65535 it is nearly black), so ``window``
decides how their values map onto the output range (8 or 16 bits):
- ``auto`` (default): the 0.5th..99.5th percentiles of the image's values (robust to a few hot or dead pixels
  and to burnt-in annotations), clipped;
- ``minmax``: the image's minimum..maximum;
- ``none``: the stored values as they are (16-bit output unchanged; 8-bit output = value / 257).
DICOM files are windowed by their own header (``data_prep.dicom``), not by this option.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.dicom import UnsupportedDicom, read_dicom
from data_prep.fingerprint import image_fingerprint
from unimlip_train.format.limits import ContentError, check_pixels

RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
WINDOWS = ("auto", "minmax", "none")
AUTO_PERCENTILES = (0.5, 99.5)
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


class ImageError(Exception):
    """This one image cannot be used (missing, truncated, unsupported); the writer skips its row."""


def is_dicom(path: str) -> bool:
    """DICOM files are recognised by suffix or by the ``DICM`` magic after the 128-byte preamble."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_image(path: str, keep_16bit: bool, max_size: int | None = None, window: str = "auto",
               frame: int = 0, max_pixels: int = 0) -> tuple[np.ndarray, dict]:
    """Decode any supported file to HxW (grayscale) or HxWx3 uint8, or HxW uint16 when ``keep_16bit``.

    Returns the array and what the shard metadata keeps about the source: ``orig_size`` [w, h], and for
    DICOM ``frames`` (the object's count), ``frame`` (the one used) and ``dicom_view`` (ViewPosition). With
    ``max_size``, JPEGs are decoded at a reduced scale (libjpeg's DCT scaling) that still leaves the long side
    >= max_size: decoding a 3000 px film to resize it to 512 px is most of the sharding time otherwise.
    An image of more than ``max_pixels`` (``--max-pixels``; 0: no limit) is refused from its header, before
    its pixels are decoded (a decompression bomb costs a skipped row, not the worker's memory).
    """
    if not Path(path).is_file():
        raise ImageError(f"image not found: {path}")
    if is_dicom(path):
        try:
            dcm = read_dicom(path, keep_16bit=keep_16bit, frame=frame, max_pixels=max_pixels)
        except UnsupportedDicom as e:
            raise ImageError(f"unsupported DICOM: {e}") from e
        except Exception as e:  # pydicom raises many types for damaged files
            raise ImageError(f"unreadable DICOM: {type(e).__name__}: {e}") from e
        arr = dcm.pixels
        return arr, {"orig_size": [int(arr.shape[1]), int(arr.shape[0])], "frames": dcm.frames,
                     "frame": dcm.frame, "dicom_view": dcm.view}
    try:
        # Only raster formats: PIL picks a plugin by content, and EPS (say, a PostScript file named .png)
        # would run Ghostscript on input that may come from elsewhere.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # --max-pixels decides, below
            im = Image.open(path, formats=RASTER_FORMATS)
        with im:
            orig = [im.width, im.height]
            check_pixels(im.width, im.height, max_pixels, "--max-pixels")
            scale = max_size / max(orig) if max_size else 1.0
            if im.format == "JPEG" and scale < 0.5:
                im.draft(im.mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im.load()
            return _pil_to_array(im, keep_16bit, window), {"orig_size": orig}
    except ContentError as e:
        raise ImageError(str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from e


def _pil_to_array(im: Image.Image, keep_16bit: bool, window: str) -> np.ndarray:
    """Normalise PIL's many modes to grayscale/RGB uint8 or grayscale uint16."""
    if im.mode in _WIDE_MODES:
        return apply_window(np.asarray(im), window, keep_16bit)
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode in ("1", "LA", "P") and _is_gray_palette(im):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def apply_window(values: np.ndarray, window: str, keep_16bit: bool) -> np.ndarray:
    """Map a high-bit-depth raster onto uint16 (``keep_16bit``) or uint8 by the ``window`` rule (module doc)."""
    top = 65535 if keep_16bit else 255
    if window == "none":
        values = np.clip(values, 0, 65535)
        return values.astype(np.uint16) if keep_16bit else np.rint(values / 257.0).astype(np.uint8)
    if window == "auto":
        low, high = (float(v) for v in np.percentile(values, AUTO_PERCENTILES))
    elif window == "minmax":
        low, high = float(values.min()), float(values.max())
    else:
        raise ValueError(f"unknown window {window!r} (use one of {', '.join(WINDOWS)})")
    if high <= low:  # a (nearly) constant image: its own min-max, black when truly constant
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, np.uint16 if keep_16bit else np.uint8)
    scaled = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    return np.rint(scaled * top).astype(np.uint16 if keep_16bit else np.uint8)


def _is_gray_palette(im: Image.Image) -> bool:
    if im.mode != "P":
        return True
    pal = np.asarray(im.convert("RGB"))
    return bool((pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all())


def resize_long_side(arr: np.ndarray, max_size: int) -> np.ndarray:
    """Downscale so the long side is at most ``max_size`` (never upscale), keeping the dtype."""
    h, w = arr.shape[:2]
    scale = max_size / max(h, w)
    if scale >= 1.0:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if arr.dtype == np.uint16:
        out = Image.fromarray(arr.astype(np.float32), "F").resize(size, Image.Resampling.LANCZOS)
        return np.clip(np.round(np.asarray(out)), 0, 65535).astype(np.uint16)
    out = Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(out)


def encode(arr: np.ndarray, jpeg_quality: int) -> tuple[str, bytes]:
    """Encode to (extension, bytes): JPEG for 8-bit, 16-bit PNG for uint16."""
    buf = io.BytesIO()
    if arr.dtype == np.uint16:
        Image.fromarray(arr).save(buf, "PNG", compress_level=6)
        return "png", buf.getvalue()
    Image.fromarray(arr).save(buf, "JPEG", quality=jpeg_quality, optimize=False)
    return "jpg", buf.getvalue()


def process_image(path: str, max_size: int, jpeg_quality: int, keep_16bit: bool, window: str = "auto",
                  frame: int = 0, max_pixels: int = 0) -> tuple[str, bytes, dict]:
    """The writer's per-image job: decode, resize, encode, fingerprint; returns (ext, bytes, metadata)."""
    arr, info = load_image(path, keep_16bit, max_size, window, frame, max_pixels)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"unsupported image shape {arr.shape}")
    ext, data = encode(resize_long_side(arr, max_size), jpeg_quality)
    return ext, data, {**info, **image_fingerprint(data)}
