"""Limits on untrusted shard content, the same for the shard tools and for training: a sample's json member is
parsed only within a size and nesting depth, and an image's pixel count is read from its header before anything
decodes it.

Why: a shard can come from elsewhere, or be damaged. ``json.loads`` of ``[[[[...]]]]`` nested 100,000 deep raises
``RecursionError`` (a traceback naming no shard), and a PNG of 13,000 x 13,000 pixels is 164 KB on disk but
169 megapixels once decoded (3.3 s and +650 MB per sample in training, measured), under PIL's own bomb limit
(89 megapixels warn, 179 raise). One such sample must cost a skipped sample with its reason, not a stalled or
killed node.

The pixel limit's default, 40 megapixels, is above any radiograph we know of: the largest flat-panel chest
detectors are 43 x 43 cm at 100-140 um pixels (3,072 x 3,072 to 4,300 x 4,300: 9.4-18.5 MP), a 35 x 43 cm
computed-radiography plate read at 100 um is 3,500 x 4,300 (15 MP), and a 24 x 30 cm mammography detector at
50 um is 4,800 x 6,000 (28.8 MP). A whole-slide pathology image is far larger and needs tiling, not this loader.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

#: A sample's json member larger than this is refused (the writer's largest, a study with its views and hashes
#: or a VQA image with all its questions, is a few KB).
MAX_JSON_BYTES = 1 << 20
#: Nesting deeper than this is refused before ``json.loads`` sees it (the writer's json nests 3 levels).
MAX_JSON_DEPTH = 64
#: ``data.max_image_pixels`` and ``unimlip-shard --max-pixels`` default (see the module doc).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers (DHT, JPG, DAC are not)


class ContentError(ValueError):
    """A shard member that is refused by a limit, or cannot be parsed; the message says which and why."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays / objects in JSON text, brackets inside strings not counted; no recursion."""
    depth = deepest = 0
    for token in _JSON_TOKEN.finditer(data):
        bracket = token.group()
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_json_member(data: bytes, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A json member's value; ``ContentError`` (a ValueError) when it is larger than ``max_bytes``, nested
    deeper than ``max_depth``, not UTF-8 or not JSON: never ``RecursionError`` or a stall."""
    if len(data) > max_bytes:
        raise ContentError(f"json member of {len(data)} bytes, above the limit of {max_bytes}")
    depth = json_depth(data)
    if depth > max_depth:
        raise ContentError(f"json member nested {depth} levels deep, above the limit of {max_depth}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ContentError(f"json member is not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of too many digits
        raise ContentError(f"json member is not valid JSON ({e})") from None


def jpeg_frame(data: bytes) -> Optional[tuple[int, int, int]]:
    """(height, width, components) from a JPEG's start-of-frame header, or None if it is not a plain JPEG."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's IHDR or a JPEG's start-of-frame header, without decoding; None for anything
    else (the caller asks PIL, which also reads only the header)."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    frame = jpeg_frame(data)
    return (frame[1], frame[0]) if frame else None


def check_pixels(width: int, height: int, max_pixels: int, setting: str) -> None:
    """``ContentError`` when ``width x height`` is above ``max_pixels`` (0: no limit); ``setting`` names the
    option that sets the limit, so the reason says what to raise."""
    if max_pixels and width * height > max_pixels:
        raise ContentError(f"image of {width} x {height} = {width * height / 1e6:.1f} megapixels, above "
                           f"{setting}={max_pixels} (refused before decoding)")
