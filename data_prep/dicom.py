"""Read one DICOM image as a display-ready grayscale array, so shards hold what a reader would see.

The DICOM pipeline is applied here, once, at sharding time: stored values -> modality LUT (rescale
slope/intercept or a Modality LUT Sequence) -> VOI transform (VOI LUT Sequence, else the first Window
Center/Width, else the image's own min-max) -> output range -> MONOCHROME1 inverted. The loader then treats
a DICOM source like any other grayscale PNG.

Choices a user should know about:
- Multi-frame objects: only the middle frame (index ``frames // 2``) is decoded and returned; one image per
  object is what an image-report pair needs, and the middle frame is the most representative of a cine/stack.
- Colour (RGB, or YBR which pydicom decodes to RGB): converted to luma (ITU-R BT.601 weights), no VOI.
- PALETTE COLOR and other photometric interpretations are refused with ``UnsupportedDicom``.
- A transfer syntax whose decoder plugin is not installed is refused before decoding, naming the syntax, its
  UID and the packages that would decode it.
"""
from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder

_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")  # pydicom hands these back as RGB
_LUMA = np.array([0.299, 0.587, 0.114])


class UnsupportedDicom(Exception):
    """A DICOM file that cannot become an image here; the message names the file and the reason."""


def read_dicom(path: str, keep_16bit: bool = False) -> np.ndarray:
    """Return the image of ``path`` as HxW uint8, or uint16 when ``keep_16bit`` and more than 8 bits are stored."""
    ds = _open(path)
    interpretation = str(ds.get("PhotometricInterpretation", "")).upper()
    if interpretation not in _GRAY + _COLOUR:
        raise UnsupportedDicom(f"{path}: photometric interpretation {interpretation or '(missing)'} is not supported")
    _check_decodable(path, ds)
    frames, bits = _header_int(path, ds, "NumberOfFrames", 1), _header_int(path, ds, "BitsStored", 8)
    if frames > 1:
        ds.pixel_array_options(index=frames // 2)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises ValueError/KeyError/... for truncated or inconsistent data
        raise UnsupportedDicom(f"{path}: pixel data cannot be decoded: {exc}") from exc

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
    return image


def _open(path: str) -> pydicom.Dataset:
    """Parse the file, turning every parse failure into one clear refusal."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise UnsupportedDicom(f"{path}: not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None else ""
        raise UnsupportedDicom(f"{path}: no pixel data{kind}; skipped")
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
