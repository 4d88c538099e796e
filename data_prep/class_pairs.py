"""Real images paired with real reports *by class*: PneumoniaMNIST chest X-rays (normal / pneumonia) with IU
X-ray reports whose MeSH major tags say the same, written as a manifest for ``unimlip-shard manifest``.

No public set pairs these images with their own reports, so a class-paired set is how the project trains
and evaluates on real pixels and real report text together (``tests/test_real_data.py``,
``bench/real_ablation.py``). Pairing rule: the images of each class, in array order (train array first),
take that class's reports in turn (report order: IU file number), cycling when the class has fewer reports
than images. IU reports are CC BY-NC-ND 4.0: keep what this writes local, never redistribute it.
"""
from __future__ import annotations

import csv
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np

CLASSES = ("normal", "pneumonia")  # PneumoniaMNIST label 0, 1
PNEUMONIA_TAGS = ("pneumonia", "consolidation", "infiltrate")


def iu_reports_by_class(reports_tgz: Path) -> dict[str, list[str]]:
    """IU X-ray reports ('FINDINGS: ... IMPRESSION: ...') whose MeSH major tags say normal / pneumonia."""
    out: dict[str, list[str]] = {name: [] for name in CLASSES}
    with tarfile.open(reports_tgz) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".xml")), key=lambda m: int(Path(m.name).stem))
        for member in members:
            root = ET.fromstring(tar.extractfile(member).read())
            tags = [(t.text or "").strip().lower() for t in root.iter("major")]
            sec = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            findings, impression = sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")
            if not tags or not (findings or impression):
                continue
            text = f"FINDINGS: {findings} IMPRESSION: {impression}"
            if all(t == "normal" for t in tags):
                out["normal"].append(text)
            elif any(k in t for t in tags for k in PNEUMONIA_TAGS):
                out["pneumonia"].append(text)
    return out


def write_class_paired_manifest(root: Path, npz_path: Path, reports_tgz: Path,
                                per_class: Optional[dict[str, int]] = None, parts: tuple[str, ...] = ("train", "val"),
                                name: str = "manifest.csv") -> Path:
    """PNGs of PneumoniaMNIST's ``parts`` arrays under ``root/png`` and ``root/<name>`` pairing each with a
    report of its class. ``per_class``: images per class taken from each array (None: all of them).

    Columns: id, image, text, labels (the class), source_split (the PneumoniaMNIST array it came from).
    """
    from PIL import Image

    npz = np.load(npz_path)
    reports = iu_reports_by_class(reports_tgz)
    (root / "png").mkdir(parents=True, exist_ok=True)
    rows, used = [], {c: 0 for c in CLASSES}
    for part in parts:
        images, labels = npz[f"{part}_images"], npz[f"{part}_labels"][:, 0]
        for label, cls in enumerate(CLASSES):
            chosen = np.flatnonzero(labels == label)
            if per_class is not None:
                chosen = chosen[:per_class[part]]
            for idx in chosen:
                sample_id = f"pmnist-{part}-{idx:04d}"
                Image.fromarray(images[idx]).save(root / "png" / f"{sample_id}.png")
                text = reports[cls][used[cls] % len(reports[cls])]
                used[cls] += 1
                rows.append({"id": sample_id, "image": f"png/{sample_id}.png", "text": text, "labels": cls,
                             "source_split": part})
    manifest = root / name
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
