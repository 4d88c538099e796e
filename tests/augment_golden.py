"""The reference views of the medical augmentation: real images, several sizes and seeds, two views per seed.

``tests/data/augment_golden.json`` was written by running this module (``python tests/augment_golden.py``) at
commit c1ac3e5, the last one whose augmentation was hand-written code (``TrainAugment`` in
``unimlip_train/data/transforms.py``: a fused OpenCV warp and its intensity steps, configured by
``data.augment.min_scale`` ... ``hflip_p``). ``test_augment_pipeline`` recomputes the views with today's default
``data.augment`` list and compares digests: bit-identical views, and the same number of draws from the sample's
generator (the draw after the views is part of the digest), so seeded streams, exact resume and the MLM draws
that follow the views in the loader stay the same.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from data_prep.dicom import read_dicom
from unimlip_train.config.schema import Config
from unimlip_train.data.transforms import decode_image

GOLDEN = Path(__file__).resolve().parent / "data" / "augment_golden.json"
PNEUMONIAMNIST_NPZ = Path(__file__).resolve().parent / "data" / "pneumoniamnist" / "pneumoniamnist_subset.npz"
SEEDS = range(12)


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cases() -> dict:
    """name -> (image as the loader decodes it, in_chans, data.image_size): real images of every kind the
    augmentation branches on (8-bit grey, 16-bit grey, RGB, a single-channel axis; small and large
    sources; very wide and very tall ones, where the crop falls back to a centred one)."""
    mnist = np.load(PNEUMONIAMNIST_NPZ)["train_images"]
    radiograph = get_testdata_file("RG1_UNCR.dcm")  # a computed radiograph, 1955 x 1841, 16 bits
    ultrasound = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array  # RGB, 480 x 640
    out = {f"pneumoniamnist_{i}": (mnist[i], 1, 64) for i in (0, 1, 200, 201)}  # 2 normal, 2 pneumonia
    out["pneumoniamnist_0_hw1"] = (mnist[0][..., None], 1, 48)
    out["radiograph_16bit"] = (decode_image(_encoded(read_dicom(radiograph, keep_16bit=True).pixels, "PNG"), 1, 64),
                               1, 64)
    out["radiograph_jpeg_224"] = (decode_image(_encoded(read_dicom(radiograph).pixels, "JPEG"), 1, 224), 1, 224)
    out["ct_16bit"] = (read_dicom(get_testdata_file("CT_small.dcm"), keep_16bit=True).pixels, 1, 64)
    out["ultrasound_rgb"] = (decode_image(_encoded(ultrasound, "JPEG"), 3, 96), 3, 96)
    wide = decode_image(_encoded(read_dicom(radiograph).pixels[700:1100], "PNG"), 1, 64)  # about 4.6 : 1
    out["radiograph_wide"], out["radiograph_tall"] = (wide, 1, 64), (np.ascontiguousarray(wide.T), 1, 64)
    return out


def digest(*arrays: np.ndarray) -> str:
    """Of the values, dtypes and shapes, a greyscale view's channel axis made explicit (HxW as HxWx1: the
    hand-written blur and tone steps dropped the axis of an HxWx1 input, which the loader never decodes to)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.reshape(a.shape[:2] + (-1,))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def views_digests(make_augment) -> dict:
    """``{case: {seed: digest}}`` of two views from one generator (as the loader makes them) and its next draw.
    ``make_augment(data_config)`` builds the augmentation of the default config at that case's size."""
    result = {}
    for name, (image, in_chans, size) in cases().items():
        data = Config().data
        data.image_size, data.in_chans = size, in_chans
        augment = make_augment(data)
        per_seed = {}
        for seed in SEEDS:
            rng = np.random.default_rng(seed)
            one, two = augment(image, rng), augment(image, rng)
            per_seed[str(seed)] = digest(one, two, np.array([rng.random()]))
        result[name] = per_seed
    return result

