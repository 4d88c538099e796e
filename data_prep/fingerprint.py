"""Image identity for the leakage audit: a sha256 of the decoded pixels and a 64-bit perceptual hash.

Both are computed from a shard's stored image bytes, so the writer (at sharding time) and the audit (on the
fly, for shards written without them) get the same values. The pixel hash finds exact copies; the perceptual
hash (pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grayscale thumbnail against their median)
also finds copies that were resized, re-encoded or stored at another bit depth, which differ in a few bits.
"""
from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
from PIL import Image

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_stored(data: bytes) -> np.ndarray:
    """A shard image (JPEG or PNG, nothing else) as stored: HxW / HxWx3 uint8, or HxW uint16."""
    with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
        if im.mode.startswith("I"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))


def pixel_sha256(pixels: np.ndarray) -> str:
    """sha256 of shape, dtype and pixel bytes: equal only for identical decoded images."""
    h = hashlib.sha256(f"{pixels.shape}:{pixels.dtype.str}".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def perceptual_hash(pixels: np.ndarray) -> str:
    """64-bit pHash as 16 hex digits; intensity is scaled to [0, 1] first, so 8- and 16-bit copies agree."""
    gray = pixels.astype(np.float32) / (65535.0 if pixels.dtype == np.uint16 else 255.0)
    if gray.ndim == 3:
        gray = gray @ _LUMA
    thumb = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(thumb)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def image_fingerprint(data: bytes) -> dict:
    """``pixel_sha256`` and ``phash`` of stored image bytes (the shard json fields of the same names)."""
    pixels = decode_stored(data)
    return {"pixel_sha256": pixel_sha256(pixels), "phash": perceptual_hash(pixels)}


def hamming(a: str, b: str) -> int:
    """Differing bits between two hex perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")
