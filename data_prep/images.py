"""Image decode -> resize -> encode for the shard writer.

One function per step so the writer's worker processes and the throughput benchmark run the very same
code. 8-bit images are stored as JPEG (small shards); 16-bit sources are stored as 16-bit PNG when the
user asks to keep them (JPEG has no 16-bit mode), otherwise mapped to 8 bits.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")


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


def load_image(path: str, keep_16bit: bool, max_size: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Decode any supported file to HxW (grayscale) or HxWx3 uint8, or HxW uint16 when ``keep_16bit``.

    Returns the array and the original [w, h]. With ``max_size``, JPEGs are decoded at a reduced scale
    (libjpeg's DCT scaling) that still leaves the long side >= max_size: decoding a 3000 px film to
    resize it to 512 px is most of the sharding time otherwise.
    """
    if not Path(path).is_file():
        raise ImageError(f"image not found: {path}")
    if is_dicom(path):
        from data_prep.dicom import UnsupportedDicom, read_dicom  # lazy: pydicom only when DICOM is used

        try:
            arr = read_dicom(path, keep_16bit=keep_16bit)
            return arr, [int(arr.shape[1]), int(arr.shape[0])]
        except UnsupportedDicom as e:
            raise ImageError(f"unsupported DICOM: {e}") from e
        except Exception as e:  # pydicom raises many types for damaged files
            raise ImageError(f"unreadable DICOM: {type(e).__name__}: {e}") from e
    try:
        # Only raster formats: PIL picks a plugin by content, and EPS (say, a PostScript file named .png)
        # would run Ghostscript on input that may come from elsewhere.
        with Image.open(path, formats=RASTER_FORMATS) as im:
            orig = [im.width, im.height]
            scale = max_size / max(orig) if max_size else 1.0
            if im.format == "JPEG" and scale < 0.5:
                im.draft(im.mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im.load()
            return _pil_to_array(im, keep_16bit), orig
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from e


def _pil_to_array(im: Image.Image, keep_16bit: bool) -> np.ndarray:
    """Normalise PIL's many modes to grayscale/RGB uint8 or grayscale uint16."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im)
        if im.mode in ("I;16", "I;16B", "I;16L") and keep_16bit:
            return arr.astype(np.uint16)
        if keep_16bit and im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return to_uint8(arr)
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode in ("1", "LA", "P") and _is_gray_palette(im):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def _is_gray_palette(im: Image.Image) -> bool:
    if im.mode != "P":
        return True
    pal = np.asarray(im.convert("RGB"))
    return bool((pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all())


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max map a high-bit-depth array to 8 bits (full contrast, as a viewer's auto-window would)."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


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


def process_image(path: str, max_size: int, jpeg_quality: int, keep_16bit: bool) -> tuple[str, bytes, list[int]]:
    """The writer's per-image job: decode, resize, encode; returns (ext, bytes, original [w, h])."""
    arr, orig = load_image(path, keep_16bit, max_size)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"unsupported image shape {arr.shape}")
    ext, data = encode(resize_long_side(arr, max_size), jpeg_quality)
    return ext, data, orig
