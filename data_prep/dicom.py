"""Read one DICOM image as a display-ready grayscale array, so shards hold what a reader would see.

The DICOM pipeline is applied here, once, at sharding time: stored values -> modality LUT (rescale
slope/intercept or a Modality LUT Sequence) -> VOI transform (VOI LUT Sequence, else the first Window
Center/Width, else the image's own min-max) -> output range -> MONOCHROME1 inverted. The loader then treats
a DICOM source like any other grayscale PNG.

Choices a user should know about:
- Multi-frame objects: one frame per object, the first (or ``frame``, 0-based); the frame count is returned so
  the writer can keep it in the sample's metadata.
- Colour: RGB, YBR (pydicom and the JPEG / JPEG 2000 decoders hand these back as RGB) and PALETTE COLOR (through
  its colour LUT) are converted to luma (ITU-R BT.601 weights), no VOI.
- A file without the 128-byte preamble and ``DICM`` prefix (old ACR-NEMA style exports) is read with
  ``force=True`` when it then parses and holds pixel data.
- Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg with libjpeg, openjpeg and rle are
  pinned in requirements.txt); a syntax whose plugin is missing is refused before decoding, naming the syntax,
  its UID and the packages that would decode it.
- The view position (PA / AP / LATERAL ...) comes from the header's ViewPosition when present.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from unimlip_train.format.limits import ContentError, check_pixels

_GRAY = ("MONOCHROME1", "MONOCHROME2")
# pydicom (uncompressed YBR_FULL/_422) and the decoders (JPEG YBR_FULL_422, JPEG 2000 YBR_ICT/RCT) return RGB.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_PALETTE = "PALETTE COLOR"
_LUMA = np.array([0.299, 0.587, 0.114])


class UnsupportedDicom(Exception):
    """A DICOM file that cannot become an image here; the message names the file and the reason."""


@dataclass
class DicomImage:
    pixels: np.ndarray  # HxW uint8, or uint16 when 16 bits were asked for and more than 8 are stored
    frames: int  # frames in the object
    frame: int  # the frame returned (0-based)
    view: str  # ViewPosition from the header ('' when absent)


def read_dicom(path: str, keep_16bit: bool = False, frame: int = 0, max_pixels: int = 0) -> DicomImage:
    """The display-ready image of ``path`` (one frame), with the header facts the shard metadata keeps. A frame
    of more than ``max_pixels`` (Rows x Columns; 0: no limit) is refused before its pixel data is decoded."""
    ds = _open(path)
    interpretation = str(ds.get("PhotometricInterpretation", "")).upper()
    if interpretation not in _GRAY + _COLOUR + (_PALETTE,):
        raise UnsupportedDicom(f"{path}: photometric interpretation {interpretation or '(missing)'} is not supported")
    _check_decodable(path, ds)
    frames, bits = _header_int(path, ds, "NumberOfFrames", 1), _header_int(path, ds, "BitsStored", 8)
    if not 0 <= frame < frames:
        raise UnsupportedDicom(f"{path}: has {frames} frame(s); frame {frame} (--frame) is out of range")
    try:
        check_pixels(_header_int(path, ds, "Columns", 0), _header_int(path, ds, "Rows", 0), max_pixels, "--max-pixels")
    except ContentError as e:
        raise UnsupportedDicom(f"{path}: {e}") from None
    if frames > 1:
        ds.pixel_array_options(index=frame)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises ValueError/KeyError/... for truncated or inconsistent data
        raise UnsupportedDicom(f"{path}: pixel data cannot be decoded: {exc}") from exc

    if interpretation == _PALETTE:
        try:
            stored = apply_color_lut(stored, ds)
        except Exception as exc:  # a missing or malformed LUT
            raise UnsupportedDicom(f"{path}: PALETTE COLOR lookup table unusable: {exc}") from exc
        if stored.dtype == np.uint16 and not ds.original_encoding[1] and "RedPaletteColorLookupTableData" in ds:
            stored = stored.byteswap()  # pydicom 3.0 reads 16-bit LUT data as little endian even in big endian files
        bits = 8 if stored.dtype == np.uint8 else 16
    wide = keep_16bit and bits > 8
    out_max = 65535 if wide else 255
    if stored.ndim == 3 and stored.shape[-1] == 3:
        values, low, high = stored.astype(np.float64) @ _LUMA, 0.0, float(2**bits - 1)
    elif stored.ndim == 2:
        try:
            values, low, high = _voi(apply_modality_lut(stored, ds), ds)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # malformed LUT/window values
            raise UnsupportedDicom(f"{path}: invalid modality LUT or VOI window: {exc}") from exc
    else:
        raise UnsupportedDicom(f"{path}: unexpected pixel array shape {stored.shape}")

    if high > low:
        scaled = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    else:  # a constant image (or a degenerate window): black rather than a division by zero
        scaled = np.zeros(values.shape, dtype=np.float64)
    image = np.rint(scaled * out_max).astype(np.uint16 if wide else np.uint8)
    if interpretation == "MONOCHROME1":  # low values are white in MONOCHROME1
        image = out_max - image
    return DicomImage(image, frames, frame, str(ds.get("ViewPosition", "") or "").strip())


def _open(path: str) -> pydicom.Dataset:
    """Parse the file (with ``force`` when the preamble is missing), turning every failure into one refusal."""
    forced = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:  # no preamble/'DICM': an ACR-NEMA style file may still parse
                ds, forced = pydicom.dcmread(path, force=True), True
        except Exception as exc:
            raise UnsupportedDicom(f"{path}: not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        if any("End of file reached" in str(w.message) for w in caught):
            raise UnsupportedDicom(f"{path}: the file is truncated (it ends inside an element, before its pixel "
                                   "data is complete); only a complete copy of the file would decode")
        if forced or not len(ds):
            raise UnsupportedDicom(f"{path}: not a readable DICOM file: no DICOM preamble, and read without one "
                                   "it holds no pixel data")
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None else ""
        raise UnsupportedDicom(f"{path}: no pixel data{kind}; skipped")
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (ACR-NEMA style): the encoding it was parsed with
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _header_int(path: str, ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer header value, or a refusal naming the bad element (real archives hold malformed values)."""
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError) as exc:
        raise UnsupportedDicom(f"{path}: invalid {keyword} value {value!r}") from exc


def _check_decodable(path: str, ds: pydicom.Dataset) -> None:
    """Refuse compressed data whose decoder plugin is missing, before any decoding is attempted."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:  # pydicom falls back to the encoding it detected while parsing
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedDicom(f"{path}: transfer syntax {uid.name} ({uid}) has no pixel decoder in pydicom; skipped") from None
    if not decoder.is_available:
        needs = " or ".join(dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies)
        raise UnsupportedDicom(f"{path}: transfer syntax {uid.name} ({uid}) needs {needs}; skipped")


def _voi(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float, float]:
    """Apply the VOI transform; return it with the input levels that mean black and white.

    This is pydicom's ``apply_voi_lut`` (VOI LUT preferred over the window), done branch by branch because
    each branch needs its own output range: pydicom's VOI functions put their result on the output range of the LUT or of the modality transform; the
    range is read back through the same functions (the whole LUT, or an infinite ramp through the window) so the
    mapping to 8/16 bits matches pydicom exactly.
    """
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        entries, first = int(sequence[0].LUTDescriptor[0]) or 65536, int(sequence[0].LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + entries), ds)
        return apply_voi(values, ds), float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return apply_windowing(values, ds), float(low), float(high)
    return values, float(values.min()), float(values.max())
