"""data_prep.dicom.read_dicom on pydicom's real fixtures (and pydicom-data's 68 objects), against references written
out here pixel by pixel or against the same image in another encoding."""
from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence

from data_prep.dicom import UnsupportedDicom, read_dicom


def fixture(name: str) -> str:
    return get_testdata_file(name)


def pixels(path: str, keep_16bit: bool = False, frame: int = 0) -> np.ndarray:
    return read_dicom(path, keep_16bit, frame).pixels


def minmax_reference(values: np.ndarray, top: int) -> np.ndarray:
    """Map min..max onto 0..top, one pixel at a time."""
    low, high = float(values.min()), float(values.max())
    out = np.zeros(values.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(values):
        out[idx] = int(round((float(v) - low) / (high - low) * top))
    return out


def linear_window_reference(values: np.ndarray, center: float, width: float, top: int) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto 0..top, one pixel at a time."""
    out = np.zeros(values.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(values):
        x = float(v)
        if x <= center - 0.5 - (width - 1) / 2:
            out[idx] = 0
        elif x > center - 0.5 + (width - 1) / 2:
            out[idx] = top
        else:
            out[idx] = int(round(((x - (center - 0.5)) / (width - 1) + 0.5) * top))
    return out


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one grey level (round-half cases differ between np.rint and round())."""
    assert actual.shape == expected.shape
    assert int(np.abs(actual.astype(np.int64) - expected).max()) <= 1


def test_ct_rescale_then_minmax_without_window():
    ds = pydicom.dcmread(fixture("CT_small.dcm"))
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = pixels(fixture("CT_small.dcm"), keep_16bit=False)
    assert image.dtype == np.uint8
    close(image, minmax_reference(hu, 255))


def test_ct_window_applies_after_rescale(tmp_path):
    ds = pydicom.dcmread(fixture("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window in Hounsfield units
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window_reference(hu, 40, 400, 255)
    image = pixels(str(path), keep_16bit=False)
    close(image, expected)
    assert (image == 0).any() and (image == 255).any()  # the window really clips both ends


def test_mr_window_from_header_and_16bit_kept():
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array
    close(pixels(fixture("MR_small.dcm"), keep_16bit=False), linear_window_reference(raw, center, width, 255))
    wide = pixels(fixture("MR_small.dcm"), keep_16bit=True)
    assert wide.dtype == np.uint16 and int(ds.BitsStored) > 8
    close(wide, linear_window_reference(raw, center, width, 65535))
    assert len(np.unique(wide)) > 256  # the 16-bit output really carries more than 8 bits


def test_8bit_source_stays_8bit_when_16bit_asked():
    ds = pydicom.dcmread(fixture("image_dfl.dcm"))
    assert int(ds.BitsStored) == 8
    assert pixels(fixture("image_dfl.dcm"), keep_16bit=True).dtype == np.uint8


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    naive = linear_window_reference(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth), 255)
    image = pixels(str(path), keep_16bit=False)
    close(image, 255 - naive)
    assert np.array_equal(image, 255 - pixels(fixture("MR_small.dcm"), keep_16bit=False))


def test_multiframe_first_frame_by_default_or_the_chosen_one():
    ds = pydicom.dcmread(fixture("rtdose.dcm"))
    frames = int(ds.NumberOfFrames)
    first = read_dicom(fixture("rtdose.dcm"))
    assert (first.frames, first.frame) == (frames, 0)
    close(first.pixels, minmax_reference(ds.pixel_array[0].astype(np.float64), 255))
    chosen = read_dicom(fixture("rtdose.dcm"), frame=frames - 1)
    close(chosen.pixels, minmax_reference(ds.pixel_array[frames - 1].astype(np.float64), 255))
    with pytest.raises(UnsupportedDicom, match=f"has {frames} frame"):
        read_dicom(fixture("rtdose.dcm"), frame=frames)


def test_rgb_becomes_luma():
    ds = pydicom.dcmread(fixture("examples_rgb_color.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    luma = np.zeros(rgb.shape[:2])
    for (y, x), _ in np.ndenumerate(luma):
        r, g, b = rgb[y, x]
        luma[y, x] = 0.299 * r + 0.587 * g + 0.114 * b
    image = pixels(fixture("examples_rgb_color.dcm"), keep_16bit=False)
    assert image.shape == rgb.shape[:2]
    assert int(np.abs(image.astype(np.int64) - np.rint(luma)).max()) <= 1


def test_compressed_syntax_without_plugin_is_refused_by_name(monkeypatch):
    path = fixture("MR_small_jpeg_ls_lossless.dcm")
    uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    decoder = get_decoder(uid)
    assert decoder.is_available  # the pinned plugins decode JPEG-LS
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))  # as without the plugins
    monkeypatch.setattr(type(decoder), "missing_dependencies",
                        property(lambda self: ["pylibjpeg - requires pylibjpeg and pylibjpeg-libjpeg"]))
    with pytest.raises(UnsupportedDicom) as info:
        read_dicom(path, keep_16bit=False)
    message = str(info.value)
    assert "JPEG-LS Lossless" in message and str(uid) in message and path in message
    assert "needs pylibjpeg and pylibjpeg-libjpeg" in message


# Lossless encodings of one image must decode to exactly the uncompressed object's pixels.
LOSSLESS_PAIRS = [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # JPEG 2000 lossless, YBR_RCT colour
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),  # RLE, PALETTE COLOR
    ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),  # big endian PALETTE COLOR (16-bit LUT data)
    ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm"),
    ("emri_small_big_endian.dcm", "emri_small.dcm"),
]


@pytest.mark.parametrize("encoded, plain", LOSSLESS_PAIRS)
def test_lossless_encodings_decode_to_the_uncompressed_pixels(encoded, plain):
    one, two = read_dicom(fixture(encoded), keep_16bit=True), read_dicom(fixture(plain), keep_16bit=True)
    assert one.frames == two.frames and one.pixels.dtype == two.pixels.dtype
    assert np.array_equal(one.pixels, two.pixels)


def test_jpeg_lossless_process_14_decodes_to_the_stored_values():
    """JPEG Lossless SV1, the commonest compressed syntax of CR/DX archives, against pydicom's own decode."""
    path = fixture("JPEG-LL.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if ds.get("WindowCenter") is None:
        close(pixels(path), minmax_reference(hu, 255))
    else:
        close(pixels(path), linear_window_reference(hu, float(ds.WindowCenter), float(ds.WindowWidth), 255))


def test_palette_colour_through_its_lut_then_luma():
    path = fixture("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2" if bits == 16 else "u1")
            for c in ("Red", "Green", "Blue")]
    stored, top = ds.pixel_array, float(2**bits - 1)
    expected = np.zeros(stored.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(stored[::7, ::7]):  # every 7th pixel: the naive loop stays quick
        i = min(max(int(v) - first, 0), (entries or 65536) - 1)
        r, g, b = (float(lut[i]) for lut in luts)
        expected[idx] = int(round((0.299 * r + 0.587 * g + 0.114 * b) / top * 255))
    image = pixels(path)[::7, ::7]
    assert int(np.abs(image.astype(np.int64) - expected[: image.shape[0], : image.shape[1]]).max()) <= 1
    assert image.std() > 10  # a real picture, not a blank


def test_ybr_is_converted_like_rgb():
    rgb = pixels(fixture("SC_rgb.dcm")).astype(np.int64)
    for name in ("SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert int(np.abs(pixels(fixture(name)).astype(np.int64) - rgb).max()) <= 3  # YBR<->RGB rounding


def test_file_without_preamble_is_read_with_force(tmp_path):
    whole = open(fixture("CT_small.dcm"), "rb").read()
    assert whole[128:132] == b"DICM"
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(whole[132:])  # no preamble, no DICM prefix: as old exports write them
    assert np.array_equal(pixels(str(bare)), pixels(fixture("CT_small.dcm")))
    face = read_dicom(fixture("OT-PAL-8-face.dcm"))  # no file meta at all, PALETTE COLOR
    assert face.pixels.shape == (480, 640) and face.pixels.std() > 10


def test_view_position_comes_from_the_header():
    assert read_dicom(fixture("RG3_UNCR.dcm")).view == pydicom.dcmread(fixture("RG3_UNCR.dcm")).ViewPosition == "AP"
    assert read_dicom(fixture("CT_small.dcm")).view == ""


def test_truncated_and_non_image_files_raise_clear_errors(tmp_path):
    whole = open(fixture("CT_small.dcm"), "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UnsupportedDicom, match="cut.dcm"):
        read_dicom(str(cut), keep_16bit=False)
    with pytest.raises(UnsupportedDicom, match="pixel data cannot be decoded"):
        read_dicom(fixture("MR_truncated.dcm"), keep_16bit=False)
    with pytest.raises(UnsupportedDicom, match="no pixel data"):
        read_dicom(fixture("rtplan.dcm"), keep_16bit=False)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file\n")
    with pytest.raises(UnsupportedDicom, match="not a readable DICOM file"):
        read_dicom(str(text), keep_16bit=False)
    with pytest.raises(UnsupportedDicom, match="truncated.*only a complete copy"):
        read_dicom(fixture("emri_small_jpeg_2k_lossless_too_short.dcm"), keep_16bit=False)


def test_voi_lut_sequence_is_preferred_over_the_window(tmp_path):
    ds = pydicom.dcmread(fixture("MR_small.dcm"))  # carries a window too: the LUT must win, as in pydicom
    table = [min(4095, i * 16) for i in range(256)]
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table), 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", table)  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "voi_lut.dcm"
    ds.save_as(path)
    expected = np.zeros(ds.pixel_array.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(ds.pixel_array):
        looked_up = table[min(int(v), len(table) - 1)]
        expected[idx] = int(round((looked_up - min(table)) / (max(table) - min(table)) * 255))
    close(pixels(str(path), keep_16bit=False), expected)


def test_invalid_window_is_a_clear_refusal(tmp_path):
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    ds.WindowWidth = 0  # LINEAR windows need a width >= 1
    path = tmp_path / "bad_window.dcm"
    ds.save_as(path)
    with pytest.raises(UnsupportedDicom, match="bad_window.dcm: invalid modality LUT or VOI window"):
        read_dicom(str(path), keep_16bit=False)


def test_pydicom_data_objects_shard(tmp_path):
    """The 68 real objects of the pydicom-data package through ``unimlip-shard``: at least 66 become samples,
    and every skip says what would decode it."""
    import data_store

    from data_prep.cli import main as shard_main

    folder = os.path.join(os.path.dirname(data_store.__file__), "data")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".dcm"))
    assert len(names) == 68
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\n" + "".join(f"{n},object {n}\n" for n in names))
    out = tmp_path / "out"
    assert shard_main(["manifest", "--manifest", str(manifest), "--images-root", folder, "--out", str(out),
                       "--max-size", "64", "--val-fraction", "0", "--workers", "2", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    print(f"pydicom-data: {index['samples']} of {len(names)} objects sharded; skipped: "
          + "; ".join(f"{os.path.basename(e['image'])}: {e['reason']}" for e in errors))
    assert index["samples"] + len(errors) == len(names)
    assert index["samples"] >= 66
    for e in errors:
        assert "needs " in e["reason"] or "only a complete copy of the file would decode" in e["reason"], e
