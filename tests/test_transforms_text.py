"""Medical augmentation, image decoding, report text handling, tokenizer and MLM masking."""
from __future__ import annotations

import io
import random
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

from conftest import IU_REPORTS_TGZ
from unimlip_train.config.schema import Config
from unimlip_train.data.augment import TrainAugment
from unimlip_train.data.collate import mlm_mask
from unimlip_train.data.text import augment_report, clean_text, model_text, sections_or_whole, split_sentences
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.data.transforms import MEAN, STD, EvalTransform, _decode_jpeg, decode_image, to_tensor


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _rngs(seed):
    return (np.random.default_rng(seed),)


def _entry(cfg, name: str) -> dict:
    """The ``data.augment`` entry of transform ``name`` (to change its arguments in place)."""
    return next(e for e in cfg.augment if e["name"] == name)


def _marker_image(size=96) -> np.ndarray:
    """Dark image with a bright vertical bar in the left part: where laterality shows."""
    arr = np.full((size, size), 30, np.uint8)
    arr[10:-10, int(0.15 * size):int(0.3 * size)] = 230
    return arr


def _bright_centroid_x(img: np.ndarray):
    cols = np.nonzero(img > 150)[1]
    return cols.mean() / img.shape[1] if len(cols) else None


def test_no_flip_by_default_keeps_left_on_the_left():
    cfg = Config().data
    cfg.image_size = 64
    aug, img = TrainAugment(cfg), _marker_image()
    xs = [_bright_centroid_x(aug(img, *_rngs(s))) for s in range(40)]
    seen = [x for x in xs if x is not None]
    assert len(seen) > 20 and all(x < 0.5 for x in seen)
    _entry(cfg, "MedicalCropAffine")["hflip_p"] = 1.0  # the check above would notice a flip
    flipped = [_bright_centroid_x(TrainAugment(cfg)(img, *_rngs(s))) for s in range(10)]
    assert all(x > 0.5 for x in flipped if x is not None)


def test_augment_shapes_dtypes_and_determinism():
    cfg = Config().data
    cfg.image_size = 48
    aug, img = TrainAugment(cfg), _marker_image(80)
    out = aug(img, *_rngs(7))
    assert out.shape == (48, 48) and out.dtype == np.uint8
    assert np.array_equal(out, aug(img, *_rngs(7)))  # randomness only from the given generators
    assert any(not np.array_equal(out, aug(img, *_rngs(s))) for s in range(8, 12))
    for chans in (1, 3):
        t = to_tensor([out, out], chans)
        assert t.shape == (2, chans, 48, 48) and t.dtype == torch.float32
        for c in range(chans):
            expected = (torch.from_numpy(out).float() / 255 - MEAN[chans][c]) / STD[chans][c]
            assert torch.allclose(t[1, c], expected, atol=1e-6)


def test_jpeg_decoded_at_reduced_scale_and_resized_once():
    rng = np.random.default_rng(0)
    arr = (rng.normal(100, 20, (512, 640))).clip(0, 255).astype(np.uint8)
    small = decode_image(_jpeg(arr), in_chans=1, target=224)
    assert small.dtype == np.uint8 and small.ndim == 2
    assert 224 <= min(small.shape) <= round(1.15 * 224) and small.shape[1] > small.shape[0]
    tiny = decode_image(_jpeg(arr[:100, :100]), in_chans=1, target=224)
    assert tiny.shape == (100, 100)  # never enlarged here
    colour = np.stack([arr, arr // 2, arr // 3], -1)[:300, :300]
    assert decode_image(_jpeg(colour), in_chans=3, target=128).shape[2] == 3
    assert decode_image(_jpeg(colour), in_chans=1, target=128).ndim == 2
    for chans, image, target in ((1, arr, 128), (3, colour, 70), (1, colour, 40), (1, arr, 600)):
        with Image.open(io.BytesIO(_jpeg(image))) as im:  # PIL's reduced-scale decode, the reference
            im.draft("RGB" if chans == 3 else "L", (target, target))
            reference = np.asarray(im.convert("RGB" if chans == 3 else "L")).astype(int)
        fast = _decode_jpeg(_jpeg(image), chans, target).astype(int)  # the OpenCV path decode_image takes
        assert fast.shape == reference.shape and np.abs(fast - reference).max() <= 1
    bmp = io.BytesIO()
    Image.fromarray(arr[:50, :50]).save(bmp, "BMP")
    with pytest.raises(ValueError, match="neither a readable JPEG nor PNG"):  # only those decoders are used
        decode_image(bmp.getvalue(), in_chans=1, target=32)


def test_augment_keeps_colour_and_single_channel_axes():
    cfg = Config().data
    cfg.image_size = 32
    crop, *steps = cfg.augment
    for step in steps:  # every intensity step always on (OpenCV's blur and lookup drop a single channel axis)
        step.update({"p": 1.0} if "p" in step else {"gamma_p": 1.0, "contrast_p": 1.0})
    rgb = np.stack([_marker_image(60)] * 3, axis=-1)
    for cfg.augment in [[crop, step] for step in steps] + [[crop, *steps]]:
        assert TrainAugment(cfg)(rgb, *_rngs(0)).shape == (32, 32, 3)
        assert TrainAugment(cfg)(_marker_image(60)[..., None], *_rngs(0)).shape == (32, 32, 1)
        assert TrainAugment(cfg)(_marker_image(60), *_rngs(0)).shape == (32, 32)


def test_crop_geometry_against_a_naive_crop_and_resize():
    """With the rotation, shift and intensity ops off, a view of a horizontal ramp is a linear ramp over a part
    of the source no smaller than the smallest crop allows, and every row is the same."""
    cfg = Config().data
    cfg.image_size = 40
    cfg.augment = cfg.augment[:1]  # the crop and warp alone
    crop = cfg.augment[0]
    crop["rotate"] = crop["shift"] = 0.0
    image = np.tile((np.arange(120) * 2).astype(np.uint8), (100, 1))  # value = 2 * x
    for seed in range(6):
        out = TrainAugment(cfg)(image, *_rngs(seed)).astype(np.float64)[3:-3, 3:-3]  # scale 0.95 may leave a rim
        assert np.allclose(out, out[:1], atol=1)  # rows equal: nothing rotated, no vertical mixing
        steps = np.diff(out[0])
        assert np.allclose(steps, steps.mean(), atol=1.01)  # linear resize of a linear ramp
        span = 40 * steps.mean() / 2  # source pixels across the output width
        smallest = np.sqrt(120 * 100 * crop["scale"][0] * 3 / 4)  # the narrowest crop the scale and ratio allow
        assert smallest / 1.05 - 1 <= span <= 120 / 0.95 + 1


def test_16bit_png_kept_and_augmented_as_float():
    arr = np.full((60, 60), 1000, np.uint16)
    arr[:, 30:] = 60000
    decoded = decode_image(_png(arr), in_chans=1, target=60)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, arr)
    cfg = Config().data
    cfg.image_size = 60
    centre = EvalTransform(cfg)(decoded)
    assert centre.dtype == np.float32 and np.allclose(centre, arr / 65535.0)  # no 8-bit quantisation
    out = TrainAugment(cfg)(decoded, *_rngs(1))
    assert out.shape == (60, 60) and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0 + 1e-6
    assert to_tensor([out], 3).shape == (1, 3, 60, 60)


def test_eval_transform_resize_and_centre_crop():
    cfg = Config().data
    cfg.image_size = 64
    arr = np.zeros((64, 128), np.uint8)
    arr[:, :32], arr[:, 96:] = 50, 200
    arr[:, 32:96] = np.arange(64, dtype=np.uint8)[None, :]
    assert np.array_equal(EvalTransform(cfg)(arr), arr[:, 32:96])
    big = EvalTransform(cfg)(np.zeros((256, 128), np.uint8))
    assert big.shape == (64, 64)


def _iu_report(number: int) -> dict:
    with tarfile.open(IU_REPORTS_TGZ) as t:
        root = ET.fromstring(t.extractfile(f"ecgen-radiology/{number}.xml").read())
    return {a.get("Label"): a.text or "" for a in root.iter("AbstractText")}


def test_real_iu_report_sections_and_deid_cleanup():
    parts = _iu_report(2)
    text = "\n".join(f"{label}: {body}" for label, body in parts.items())
    findings = "Borderline cardiomegaly. Midline sternotomy. Enlarged pulmonary arteries. Clear lungs. Inferior."
    impression = "No acute pulmonary findings."
    assert model_text(text) == f"{impression} {findings}"  # default: impression first, truncation cuts findings
    assert model_text(text, "findings+impression", "findings_first") == f"{findings} {impression}"
    assert model_text(text, ["findings", "impression"]) == f"{findings} {impression}"  # a list keeps its order
    assert model_text(text, "impression") == impression and model_text(text, "findings") == findings
    one = _iu_report(1)
    assert clean_text(one["IMPRESSION"]) == "Normal chest x-ray."  # real "x-XXXX.": the one unambiguous redaction
    assert clean_text(one["FINDINGS"]).endswith("There are no of a pleural effusion. There is no evidence of "
                                                "pneumothorax.")


def test_section_selection_and_cleanup_rules():
    assert sections_or_whole("no headers here.", ["findings"]) == "no headers here."
    mimic = ("FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n INDICATION:  ___F with cough\n"
             " FINDINGS: \n Lungs are clear.  No effusion.\n \n IMPRESSION: \n No acute process.\n")
    assert model_text(mimic) == "No acute process. Lungs are clear. No effusion."
    assert model_text("INDICATION: pain.") == "INDICATION: pain."  # nothing wanted: keep the text
    structured = "Findings:\nLungs: clear.\nHeart: normal size.\nImpression: normal."
    assert model_text(structured) == "normal. Lungs: clear. Heart: normal size."  # sub-headings stay
    assert clean_text("  Heart   size  normal .. Lungs clear ,ok  ") == "Heart size normal. Lungs clear,ok"
    assert clean_text("XXXX. Stable.") == "Stable."
    assert model_text("FINDINGS: Nodule 1.8 cm. IMPRESSION: 1. Enlarged heart. 2. Pacemaker in place.") == \
        "Enlarged heart. Pacemaker in place. Nodule 1.8 cm."
    # usual names in capitals anywhere (line breaks lost), plural = singular, each section ends a sentence;
    # a usual name in lower case mid-sentence is text, not a header
    flat = ("EXAMINATION: CHEST (PA AND LAT) INDICATION: cough FINDINGS: Clear lungs "
            "IMPRESSIONS: Compared to prior exam: no change")
    assert model_text(flat) == "Compared to prior exam: no change. Clear lungs."
    assert clean_text("1) ___ lines unchanged. 2) Pacer. Factor XX deficiency.") == \
        "Lines unchanged. Pacer. Factor XX deficiency."  # "XX" is not a de-identification token


def test_random_section_is_one_available_section_seeded():
    text = "FINDINGS: Clear lungs. Normal heart.\nIMPRESSION: No acute process."
    picks = [model_text(text, "random", rng=random.Random(seed)) for seed in range(200)]
    assert set(picks) == {"Clear lungs. Normal heart.", "No acute process."}
    assert 60 < picks.count("No acute process.") < 140  # about half each
    assert picks == [model_text(text, "random", rng=random.Random(seed)) for seed in range(200)]  # seeded
    assert {model_text("IMPRESSION: Only this.", "random", rng=random.Random(s)) for s in range(20)} == {"Only this."}
    assert model_text("A caption without headers.", "random", rng=random.Random(0)) == "A caption without headers."
    assert model_text(text, "random") == "No acute process. Clear lungs. Normal heart."  # evaluation: no rng


def test_truncation_keeps_the_impression_when_it_comes_first(tokenizer):
    findings = " ".join(["Lungs are clear."] * 12)
    text = f"FINDINGS: {findings}\nIMPRESSION: Heart."
    ids = tokenizer(model_text(text), truncation=True, max_length=16)["input_ids"]
    late = tokenizer(model_text(text, order="findings_first"), truncation=True, max_length=16)["input_ids"]
    wanted = tokenizer("heart", add_special_tokens=False)["input_ids"]
    assert set(wanted) <= set(ids) and not set(wanted) <= set(late)


def test_text_augmentation():
    text = "One a. Two b. Three c. Four d."
    sentences = split_sentences(text)
    shuffled = [augment_report(text, random.Random(s), 1.0, 0.0, 0.0) for s in range(10)]
    assert all(sorted(split_sentences(t)) == sorted(sentences) for t in shuffled)
    assert any(t != text for t in shuffled)
    dropped = [augment_report(text, random.Random(s), 0.0, 0.999, 0.0) for s in range(10)]
    assert all(len(split_sentences(t)) == 1 and t in sentences for t in dropped)
    assert augment_report(text, random.Random(0), 0.0, 0.0, 0.0) == text
    for s in range(10):
        masked = augment_report(text, random.Random(s), 0.0, 0.0, 1.0, mask_token="[MASK]").split(" ")
        assert masked.count("[MASK]") == 1 and 8 - 3 + 1 <= len(masked) <= 8
    assert augment_report(text, random.Random(3), 0.5, 0.2, 0.3) == augment_report(text, random.Random(3), 0.5, 0.2, 0.3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + "no acute process lungs are clear heart".split()
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def test_tokenizer_loading_and_truncation(tokenizer, tmp_path):
    enc = tokenizer(["lungs are clear . " * 20, "no"], padding="max_length", truncation=True, max_length=12)
    assert [len(x) for x in enc["input_ids"]] == [12, 12]
    assert enc["input_ids"][0][-1] == tokenizer.sep_token_id and enc["input_ids"][0][0] == tokenizer.cls_token_id
    assert enc["attention_mask"][1] == [1, 1, 1] + [0] * 9
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_packaged_default_tokenizer():
    tok = load_tokenizer("")
    assert tok.pad_token and tok.mask_token
    ids = tok("small right pleural effusion.")["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.cls_token_id


def test_mlm_masking_respects_special_tokens(tokenizer):
    texts = ["lungs are clear . heart no acute process ."] * 40 + ["no", ""]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt",
                    return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids])
    draws = torch.from_numpy(np.stack([np.random.default_rng(s).random((3, 16), dtype=np.float32)
                                       for s in range(len(texts))]))
    masked, labels = mlm_mask(ids, special, draws, 0.3, tokenizer.mask_token_id, random_ids)
    targets = labels != -100
    assert not (targets & (special == 1)).any()  # never a special token
    assert torch.equal(masked[special == 1], ids[special == 1])
    assert torch.equal(labels[targets], ids[targets])  # labels are the original tokens
    assert torch.equal(masked[~targets], ids[~targets])  # only target positions change
    assert (targets[:41].sum(1) >= 1).all() and targets[41].sum() == 0  # empty text: nothing to mask
    changed = masked[targets]
    share_mask = (changed == tokenizer.mask_token_id).float().mean().item()
    assert 0.6 < share_mask < 0.95 and not torch.isin(changed[changed != tokenizer.mask_token_id],
                                                      torch.tensor(tokenizer.all_special_ids)).any()
    again = mlm_mask(ids[:5], special[:5], draws[:5], 0.3, tokenizer.mask_token_id, random_ids)
    assert torch.equal(again[0], masked[:5]) and torch.equal(again[1], labels[:5])  # per row, not per batch


def test_mlm_masking_follows_berts_rule_token_by_token(tokenizer):
    """Against a plain loop over every token: chosen iff non-special and its draw < p (at least one per row);
    then [MASK] below 0.8, a random non-special token in [0.8, 0.9), the original token above."""
    texts = ["lungs are clear . heart no acute process ."] * 300
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt",
                    return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids])
    draws = torch.rand(len(texts), 3, 16, generator=torch.Generator().manual_seed(0))
    masked, labels = mlm_mask(ids, special, draws, 0.3, tokenizer.mask_token_id, random_ids)
    kinds = {"mask": 0, "random": 0, "kept": 0}
    for r in range(len(texts)):
        candidates = [c for c in range(16) if special[r, c] == 0]
        chosen = {c for c in candidates if draws[r, 0, c] < 0.3} or {min(candidates, key=lambda c: draws[r, 0, c])}
        for c in range(16):
            if c not in chosen:
                assert (masked[r, c], labels[r, c]) == (ids[r, c], -100), (r, c)
                continue
            assert labels[r, c] == ids[r, c]
            action = float(draws[r, 1, c])
            if action < 0.8:
                expected, kind = tokenizer.mask_token_id, "mask"
            elif action < 0.9:
                expected, kind = int(random_ids[min(int(float(draws[r, 2, c]) * len(random_ids)), len(random_ids) - 1)]), "random"
            else:
                expected, kind = int(ids[r, c]), "kept"
            assert masked[r, c] == expected, (r, c, kind)
            kinds[kind] += 1
    total = sum(kinds.values())
    assert abs(kinds["random"] / total - 0.1) < 0.03 and abs(kinds["kept"] / total - 0.1) < 0.03
    swapped = masked[(labels != -100) & (masked != tokenizer.mask_token_id) & (masked != ids)]
    assert len(swapped) > 0.07 * total and not torch.isin(swapped, torch.tensor(tokenizer.all_special_ids)).any()
