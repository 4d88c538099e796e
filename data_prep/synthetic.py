"""A synthetic "medical-like" chest X-ray dataset whose reports state what the images show.

Why: the embedded default and the learning tests need image-report pairs where retrieval above chance is
meaningful and checkable on a CPU in minutes. Each image is a frontal chest radiograph caricature (thorax,
lungs, ribs, heart, spine, diaphragm) with findings drawn large and bright enough to survive 64-96 px
(lobar opacities, effusions, cardiomegaly, pneumothorax, devices), and a radiology-style report with
FINDINGS and IMPRESSION sections describing exactly those findings in varied wording. Patients have one
or two studies (the ``group``). Everything is drawn from ``numpy.random.default_rng((seed, patient))``,
so a sample depends only on (seed, patient index, image size), not on ``n`` or on the machine.
Image convention as in radiology: the patient's right is on the image's left.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from unimlip_train.format.rows import Row

SOURCE_DIR = ".synthetic-src"  # inside --out; the writer reads the generated images from there

# Lobe -> (x, y) centre in normalised image coordinates (x grows to the patient's left).
LOBES = {
    "right upper lobe": (0.30, 0.31),
    "right middle lobe": (0.33, 0.53),
    "right lower lobe": (0.29, 0.67),
    "left upper lobe": (0.70, 0.32),
    "left lower lobe": (0.72, 0.66),
}
DEVICES = ("pacemaker", "central venous catheter", "endotracheal tube", "nasogastric tube")
DEVICE_LABELS = {"pacemaker": "Pacemaker", "central venous catheter": "Central Line",
                 "endotracheal tube": "Endotracheal Tube", "nasogastric tube": "Nasogastric Tube"}


@dataclass
class Findings:
    opacity: tuple[str, str] | None = None  # (lobe, "small" | "large")
    effusion: tuple[str, str] | None = None  # ("right" | "left" | "bilateral", "small" | "moderate")
    cardiomegaly: bool = False
    pneumothorax: tuple[str, str] | None = None  # (side, "small" | "large")
    devices: list[str] = field(default_factory=list)

    def labels(self) -> list[str]:
        out = []
        if self.opacity:
            out.append("Opacity")
        if self.effusion:
            out.append("Pleural Effusion")
        if self.cardiomegaly:
            out.append("Cardiomegaly")
        if self.pneumothorax:
            out.append("Pneumothorax")
        if not out:
            out.append("No Finding")
        return out + [DEVICE_LABELS[d] for d in self.devices]

    def as_dict(self) -> dict:
        return {"opacity": list(self.opacity) if self.opacity else None,
                "effusion": list(self.effusion) if self.effusion else None,
                "cardiomegaly": self.cardiomegaly,
                "pneumothorax": list(self.pneumothorax) if self.pneumothorax else None,
                "devices": list(self.devices)}


@dataclass
class SyntheticSample:
    id: str
    group: str
    image: np.ndarray  # HxW uint8
    report: str
    labels: list[str]
    findings: Findings
    view: str


def sample_findings(rng: np.random.Generator) -> Findings:
    f = Findings()
    if rng.random() < 0.55:
        f.opacity = (str(rng.choice(list(LOBES))), str(rng.choice(["small", "large"])))
    if rng.random() < 0.35:
        f.effusion = (str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.4, 0.2])),
                      str(rng.choice(["small", "moderate"])))
    f.cardiomegaly = bool(rng.random() < 0.3)
    if rng.random() < 0.12:
        f.pneumothorax = (str(rng.choice(["right", "left"])), str(rng.choice(["small", "large"])))
        if f.opacity and f.opacity[0].startswith(f.pneumothorax[0]):  # a collapsed lung would hide the opacity
            f.pneumothorax = ("left" if f.pneumothorax[0] == "right" else "right", f.pneumothorax[1])
    f.devices = [d for d, p in zip(DEVICES, (0.15, 0.2, 0.15, 0.12)) if rng.random() < p]
    return f


# ----------------------------------------------------------------------------------------------- images

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)  # X, Y


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float, soft: float = 0.08) -> np.ndarray:
    """Ellipse weight in [0, 1] with a soft rim (soft: rim width relative to the radius)."""
    x, y = _grid(size)
    d2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip((1.0 - d2) / (2 * soft), 0.0, 1.0)  # 1 - d2 ~ 2 (1 - d) near the rim: no sqrt needed


def _blend(img: np.ndarray, level: float, weight: np.ndarray) -> np.ndarray:
    return img * (1.0 - weight) + level * weight


def _lines(size: int, polylines: list[tuple[list[tuple[float, float]], float]]) -> np.ndarray:
    """Rasterise polylines given in normalised coordinates with widths relative to the image size."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for points, width in polylines:
        draw.line([(x * size, y * size) for x, y in points], fill=255, width=max(1, round(width * size)),
                  joint="curve")
    return np.asarray(layer, dtype=np.float32) / 255.0


def draw_image(rng: np.random.Generator, anatomy: dict, f: Findings, size: int) -> np.ndarray:
    """Render one frontal chest image (uint8) with the findings drawn salient at low resolution."""
    x, y = _grid(size)
    dx, dy = rng.normal(0, 0.012, 2)  # positioning differs a little between studies
    w = anatomy["width"]
    img = np.full((size, size), anatomy["background"], np.float32)
    body = _ellipse(size, 0.5 + dx, 0.58 + dy, 0.46 * w, 0.55, 0.05)
    img = _blend(img, anatomy["tissue"], body)
    img = _blend(img, anatomy["tissue"], ((np.abs(x - 0.5 - dx) < 0.09) & (y < 0.2)).astype(np.float32))

    # Lungs: ellipses cut by the diaphragm domes.
    dome = 0.80 + dy + 0.06 * ((x - 0.5 - dx) / 0.3) ** 2
    lungs = []
    for side, cx in (("right", 0.31), ("left", 0.69)):
        m = _ellipse(size, cx + dx + (cx - 0.5) * (w - 1), 0.5 + dy, 0.155 * w, 0.33) * (y < dome)
        lungs.append((side, m))
    lung = np.maximum(lungs[0][1], lungs[1][1])
    img = _blend(img, anatomy["lung"] + _texture(anatomy["texture_seed"], size), lung)

    # Ribs over the lungs, the spine and mediastinum, the heart, the abdomen below the domes.
    ribs = []
    for k in range(8):
        yk = 0.22 + 0.072 * k + dy
        for s in (-1, 1):
            ribs.append(([(0.5 + s * 0.03 + dx, yk), (0.5 + s * 0.16 + dx, yk - 0.035),
                          (0.5 + s * 0.30 * w + dx, yk + 0.02), (0.5 + s * 0.38 * w + dx, yk + 0.09)], 0.018))
    img += 28 * _lines(size, ribs) * (0.4 + 0.6 * lung)
    img = _blend(img, anatomy["bone"], np.clip(1 - np.abs(x - 0.5 - dx) / 0.045, 0, 1) * (y > 0.05))
    img = _blend(img, anatomy["lung"] - 10, ((np.abs(x - 0.5 - dx) < 0.014) & (y < 0.36 + dy)).astype(np.float32))
    heart_rx = 0.19 if f.cardiomegaly else 0.12
    img = _blend(img, anatomy["heart"], _ellipse(size, 0.55 + dx + (heart_rx - 0.12) * 0.5, 0.67 + dy,
                                                   heart_rx * w, 0.14 if f.cardiomegaly else 0.12, 0.1))
    img = _blend(img, anatomy["heart"] - 10, (y > dome) * np.clip(body * 2 - 1, 0, 1))

    if f.opacity:
        lx, ly = LOBES[f.opacity[0]]
        r = (0.08 if f.opacity[1] == "small" else 0.11) * (1 + rng.normal(0, 0.08))
        cx, cy = lx + dx + (lx - 0.5) * (w - 1) + rng.normal(0, 0.01), ly + dy + rng.normal(0, 0.01)
        img += 120 * _ellipse(size, cx, cy, r, r * 1.1, 0.35) * np.maximum(lung, 0.5)
    if f.effusion:
        height = 0.12 if f.effusion[1] == "small" else 0.22
        for side, m in lungs:
            if f.effusion[0] in (side, "bilateral"):
                lateral = np.abs(x - 0.5 - dx) / 0.35
                level = 0.78 + dy - height + 0.08 * (1 - lateral)  # meniscus: higher laterally
                img = _blend(img, 165, m * np.clip((y - level) * size / 3, 0, 1))
    if f.pneumothorax:
        side, extent = f.pneumothorax
        sgn = -1 if side == "right" else 1
        m = dict(lungs)[side]
        keep = _ellipse(size, 0.5 + sgn * 0.17 + dx, 0.55 + dy, 0.11 if extent == "small" else 0.075,
                        0.27 if extent == "small" else 0.2, 0.05)
        img = _blend(img, 6, m * (1 - keep))
        rim = np.clip(keep * 4, 0, 1) * (1 - np.clip(keep * 4 - 1, 0, 1))  # visceral pleural line
        img += 90 * rim * m

    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(size / 200)), np.float32)

    devices = []

    def shift(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(px + dx, py + dy) for px, py in points]

    if "pacemaker" in f.devices:
        box = ((x > 0.74 + dx) & (x < 0.84 + dx) & (y > 0.16 + dy) & (y < 0.23 + dy)).astype(np.float32)
        img = np.maximum(img, 250 * box)
        devices.append((shift([(0.76, 0.2), (0.6, 0.3), (0.52, 0.5), (0.56, 0.68)]), 0.012))
    if "central venous catheter" in f.devices:
        devices.append((shift([(0.18, 0.12), (0.36, 0.2), (0.45, 0.27), (0.47, 0.45)]), 0.014))
    if "endotracheal tube" in f.devices:
        devices.append(([(0.5 + dx, 0.0), (0.5 + dx, 0.3 + dy)], 0.026))
    if "nasogastric tube" in f.devices:
        devices.append(([(0.52 + dx, 0.0)] + shift([(0.53, 0.5), (0.56, 0.82), (0.68, 0.9)]), 0.012))
    if devices:
        img = np.maximum(img, 235 * _lines(size, devices))

    img = img * anatomy["contrast"] + rng.normal(0, 3.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _texture(seed: int, size: int) -> np.ndarray:
    """Lung markings of one patient (the same in each of the patient's studies)."""
    noise = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
    blurred = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(size / 90))
    return 30 * (np.asarray(blurred, np.float32) / 255.0 - 0.5)


def _anatomy(rng: np.random.Generator) -> dict:
    """Per-patient body habitus and exposure, shared by the patient's studies."""
    return {"width": float(rng.uniform(0.9, 1.1)), "background": float(rng.uniform(5, 25)),
            "tissue": float(rng.uniform(85, 110)), "lung": float(rng.uniform(40, 60)),
            "bone": float(rng.uniform(125, 150)), "heart": float(rng.uniform(130, 150)),
            "contrast": float(rng.uniform(0.9, 1.1)), "texture_seed": int(rng.integers(2**63))}


# ----------------------------------------------------------------------------------------------- reports

def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _opacity_sentence(rng, lobe: str, size: str) -> str:
    adj = _pick(rng, ["small", "subtle", "focal", "patchy"] if size == "small" else
                ["large", "extensive", "dense", "large confluent"])
    noun = _pick(rng, ["opacity", "consolidation", "airspace opacity", "area of consolidation"])
    cm = rng.uniform(1.5, 3.0) if size == "small" else rng.uniform(4.5, 7.5)
    measure = _pick(rng, ["", f", measuring approximately {cm:.1f} cm", f" measuring up to {cm:.1f} cm"])
    return _pick(rng, [
        f"There is a {adj} {noun} in the {lobe}{measure}.",
        f"{_cap(adj)} {noun} is seen in the {lobe}{measure}.",
        f"A {adj} {noun} projects over the {lobe}{measure}.",
        f"{_cap(adj)} {noun} involving the {lobe}.",
    ])


def _effusion_sentence(rng, side: str, size: str) -> str:
    where = "bilateral" if side == "bilateral" else f"{side}-sided"
    eff = "pleural effusions" if side == "bilateral" else "pleural effusion"
    verb = "are" if side == "bilateral" else "is"
    return _pick(rng, [
        f"There {verb} {'' if side == 'bilateral' else 'a '}{size} {where} {eff}.",
        f"{_cap(size)} {where} {eff} with blunting of the costophrenic angle{'s' if side == 'bilateral' else ''}.",
        f"{_cap(size)} {side} {eff} {verb} present.",
    ])


def _ptx_sentence(rng, side: str, size: str) -> str:
    return _pick(rng, [
        f"There is a {size} {side} apical pneumothorax.",
        f"{_cap(size)} {side}-sided pneumothorax with a visible pleural line.",
        f"A {size} pneumothorax is present on the {side}.",
    ])


_DEVICE_SENTENCES = {
    "pacemaker": ["A left chest wall pacemaker is in place with lead terminating in the right ventricle.",
                  "Left-sided cardiac pacemaker with leads in expected position.",
                  "Dual-chamber pacemaker generator overlies the left upper chest."],
    "central venous catheter": ["A right internal jugular central venous catheter terminates in the superior "
                                "vena cava.",
                                "Right-sided central line with tip at the cavoatrial junction.",
                                "Central venous catheter tip projects over the distal SVC."],
    "endotracheal tube": ["Endotracheal tube terminates approximately 4 cm above the carina.",
                          "The endotracheal tube is in satisfactory position above the carina.",
                          "An ET tube is present with tip in the mid trachea."],
    "nasogastric tube": ["A nasogastric tube courses below the diaphragm into the stomach.",
                         "Enteric tube tip is in the stomach.",
                         "NG tube passes into the stomach, side port below the GE junction."],
}
_DEVICE_IMPRESSION = {"pacemaker": "pacemaker", "central venous catheter": "central venous catheter",
                      "endotracheal tube": "endotracheal tube", "nasogastric tube": "nasogastric tube"}


def write_report(rng: np.random.Generator, f: Findings, view: str) -> str:
    """FINDINGS + IMPRESSION text stating exactly the drawn findings, with varied wording and order."""
    findings = [_pick(rng, _DEVICE_SENTENCES[d]) for d in f.devices]
    lung = []
    if f.opacity:
        lung.append(_opacity_sentence(rng, *f.opacity))
        lung.append(_pick(rng, ["The remaining lungs are clear.", "Elsewhere the lungs are clear.", ""]))
    else:
        lung.append(_pick(rng, ["The lungs are clear.", "No focal consolidation.",
                                "Lungs are clear without focal airspace disease.",
                                "No focal airspace opacity is seen."]))
    pleura = []
    if f.effusion:
        pleura.append(_effusion_sentence(rng, *f.effusion))
    if f.pneumothorax:
        pleura.append(_ptx_sentence(rng, *f.pneumothorax))
    if not f.effusion and not f.pneumothorax:
        pleura.append(_pick(rng, ["No pleural effusion or pneumothorax.",
                                  "There is no pleural effusion or pneumothorax.",
                                  "No effusion or pneumothorax is identified."]))
    elif not f.effusion:
        pleura.append(_pick(rng, ["No pleural effusion.", "No effusion."]))
    elif not f.pneumothorax:
        pleura.append(_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]))
    heart = [_pick(rng, ["The heart is enlarged.", "Moderate cardiomegaly.", "The cardiac silhouette is enlarged.",
                         "Cardiomegaly is present."]) if f.cardiomegaly else
             _pick(rng, ["Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                         "Normal heart size.", "The cardiac silhouette is normal in size."])]
    bones = [_pick(rng, ["", "", "No acute osseous abnormality.", "Osseous structures are intact.",
                         "Mild degenerative changes of the thoracic spine."])]
    order = [findings, lung, pleura, heart] if rng.random() < 0.6 else [heart, findings, pleura, lung]
    body = " ".join(s for part in order + [bones] for s in part if s)

    impressions = []
    if f.opacity:
        lobe = f.opacity[0]
        impressions.append(_pick(rng, [f"{_cap(lobe)} pneumonia.", f"{_cap(lobe)} consolidation, likely pneumonia.",
                                       f"{_cap(f.opacity[1])} {lobe} opacity, atelectasis or pneumonia.",
                                       f"{_cap(lobe)} opacity, clinical correlation recommended."]))
    if f.effusion:
        what = "bilateral pleural effusions" if f.effusion[0] == "bilateral" else f"{f.effusion[0]} pleural effusion"
        impressions.append(f"{_cap(f.effusion[1])} {what}.")
    if f.pneumothorax:
        impressions.append(f"{_cap(f.pneumothorax[1])} {f.pneumothorax[0]} pneumothorax.")
    if f.cardiomegaly:
        impressions.append(_pick(rng, ["Cardiomegaly.", "Enlarged cardiac silhouette."]))
    if f.devices:
        names = [_DEVICE_IMPRESSION[d] for d in f.devices]
        impressions.append(_cap(" and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names))
                           + _pick(rng, [" in satisfactory position.", " as described.", " in place."]))
    if not (f.opacity or f.effusion or f.pneumothorax or f.cardiomegaly):
        impressions.insert(0, _pick(rng, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                          "Normal chest radiograph.", "No active disease."]))
    if len(impressions) > 1 and rng.random() < 0.5:
        impression = " ".join(f"{i}. {s}" for i, s in enumerate(impressions, 1))
    else:
        impression = " ".join(impressions)
    header = _pick(rng, ["", "", f"EXAMINATION: Chest radiograph, {view} view. ",
                         "INDICATION: " + _pick(rng, ["Cough and fever.", "Shortness of breath.", "Chest pain.",
                                                      "Line placement.", "Follow-up.", "Hypoxia."]) + " "])
    return f"{header}FINDINGS: {body} IMPRESSION: {impression}"


# ----------------------------------------------------------------------------------------------- dataset

def _studies(rng: np.random.Generator) -> int:
    return 1 + int(rng.random() < 0.5)


def generate_patient(seed: int, patient: int, size: int, limit: int = 2) -> list[SyntheticSample]:
    """The first ``limit`` of the one or two studies of one patient; depends only on (seed, patient, size)."""
    rng = np.random.default_rng((seed, patient))
    studies = min(_studies(rng), limit)
    anatomy = _anatomy(rng)
    group = f"synpat-{patient:06d}"
    out = []
    for study in range(studies):
        f = sample_findings(rng)
        view = "AP" if {"endotracheal tube", "central venous catheter"} & set(f.devices) else "PA"
        image = draw_image(rng, anatomy, f, size)
        out.append(SyntheticSample(id=f"{group}-{study + 1}", group=group, image=image,
                                   report=write_report(rng, f, view), labels=f.labels(), findings=f, view=view))
    return out


def patient_plan(n: int, seed: int) -> list[tuple[int, int]]:
    """(patient, studies to take) covering exactly ``n`` images, without drawing any image."""
    plan, count, patient = [], 0, 0
    while count < n:
        take = min(_studies(np.random.default_rng((seed, patient))), n - count)
        plan.append((patient, take))
        count += take
        patient += 1
    return plan


def generate(n: int, seed: int = 0, size: int = 128) -> Iterator[SyntheticSample]:
    """The first ``n`` samples of the dataset for ``seed`` (patients in order, 1-2 studies each)."""
    for patient, take in patient_plan(n, seed):
        yield from generate_patient(seed, patient, size, take)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of images to generate")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images in px (default 128)")


def _write_patient(task: tuple) -> list[dict]:
    """Worker job: draw one patient's studies, save them as PNG, return the rows' fields."""
    seed, patient, size, take, src = task
    rows = []
    for s in generate_patient(seed, patient, size, take):
        path = Path(src) / f"{s.id}.png"
        Image.fromarray(s.image).save(path, compress_level=1)
        rows.append({"id": s.id, "image": str(path), "text": s.report, "group": s.group, "labels": s.labels,
                     "metadata": {"source": "synthetic", "orig_path": f"synthetic/{s.id}.png", "view": s.view,
                                  "findings": s.findings.as_dict()}})
    return rows


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    """Generate images into ``--out``/.synthetic-src (PNG, in ``--workers`` processes) and yield their rows."""
    src = Path(args.out) / SOURCE_DIR
    src.mkdir(parents=True, exist_ok=True)
    tasks = [(args.seed, patient, args.image_size, take, str(src)) for patient, take in patient_plan(args.n, args.seed)]
    workers = min(getattr(args, "workers", 1), len(tasks))
    if workers <= 1:
        for rows in map(_write_patient, tasks):
            yield from (Row(**r) for r in rows)
        return
    with mp.get_context("spawn").Pool(workers, initializer=signal.signal,  # as in data_prep.pool.encode_results
                                      initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        for rows in pool.imap(_write_patient, tasks, chunksize=16):
            yield from (Row(**r) for r in rows)
