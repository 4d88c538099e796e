"""data_prep.dicom.read_dicom on pydicom's real fixtures, against references written out here pixel by pixel."""
from __future__ import annotations

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
    image = read_dicom(fixture("CT_small.dcm"), keep_16bit=False)
    assert image.dtype == np.uint8
    close(image, minmax_reference(hu, 255))


def test_ct_window_applies_after_rescale(tmp_path):
    ds = pydicom.dcmread(fixture("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window in Hounsfield units
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window_reference(hu, 40, 400, 255)
    image = read_dicom(str(path), keep_16bit=False)
    close(image, expected)
    assert (image == 0).any() and (image == 255).any()  # the window really clips both ends


def test_mr_window_from_header_and_16bit_kept():
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array
    close(read_dicom(fixture("MR_small.dcm"), keep_16bit=False), linear_window_reference(raw, center, width, 255))
    wide = read_dicom(fixture("MR_small.dcm"), keep_16bit=True)
    assert wide.dtype == np.uint16 and int(ds.BitsStored) > 8
    close(wide, linear_window_reference(raw, center, width, 65535))
    assert len(np.unique(wide)) > 256  # the 16-bit output really carries more than 8 bits


def test_8bit_source_stays_8bit_when_16bit_asked():
    ds = pydicom.dcmread(fixture("image_dfl.dcm"))
    assert int(ds.BitsStored) == 8
    assert read_dicom(fixture("image_dfl.dcm"), keep_16bit=True).dtype == np.uint8


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    naive = linear_window_reference(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth), 255)
    image = read_dicom(str(path), keep_16bit=False)
    close(image, 255 - naive)
    assert np.array_equal(image, 255 - read_dicom(fixture("MR_small.dcm"), keep_16bit=False))


def test_multiframe_takes_the_middle_frame():
    ds = pydicom.dcmread(fixture("rtdose.dcm"))
    frames = int(ds.NumberOfFrames)
    middle = ds.pixel_array[frames // 2].astype(np.float64)
    close(read_dicom(fixture("rtdose.dcm"), keep_16bit=False), minmax_reference(middle, 255))


def test_rgb_becomes_luma():
    ds = pydicom.dcmread(fixture("examples_rgb_color.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    luma = np.zeros(rgb.shape[:2])
    for (y, x), _ in np.ndenumerate(luma):
        r, g, b = rgb[y, x]
        luma[y, x] = 0.299 * r + 0.587 * g + 0.114 * b
    image = read_dicom(fixture("examples_rgb_color.dcm"), keep_16bit=False)
    assert image.shape == rgb.shape[:2]
    assert int(np.abs(image.astype(np.int64) - np.rint(luma)).max()) <= 1


def test_compressed_syntax_without_plugin_is_refused_by_name():
    path = fixture("MR_small_jpeg_ls_lossless.dcm")
    uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(uid).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    with pytest.raises(UnsupportedDicom) as info:
        read_dicom(path, keep_16bit=False)
    message = str(info.value)
    assert "JPEG-LS Lossless" in message and str(uid) in message and path in message and "needs" in message


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
    with pytest.raises(UnsupportedDicom, match="PALETTE COLOR"):
        read_dicom(fixture("examples_palette.dcm"), keep_16bit=False)


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
    close(read_dicom(str(path), keep_16bit=False), expected)


def test_invalid_window_is_a_clear_refusal(tmp_path):
    ds = pydicom.dcmread(fixture("MR_small.dcm"))
    ds.WindowWidth = 0  # LINEAR windows need a width >= 1
    path = tmp_path / "bad_window.dcm"
    ds.save_as(path)
    with pytest.raises(UnsupportedDicom, match="bad_window.dcm: invalid modality LUT or VOI window"):
        read_dicom(str(path), keep_16bit=False)
