"""Synthetic medical VQA: the synthetic chest-X-ray-like images with questions whose answers the image decides.

Why: the VQA fine-tuning protocol needs a set where answering above a question-only baseline is possible and
checkable on a CPU in minutes. Images, findings and patients are those of ``data_prep.synthetic`` (same seed,
same images); each image gets a few questions about its drawn findings:

* closed (yes/no): effusion, enlarged heart, pneumothorax, opacity in the right / left lung, pacemaker. Each is
  asked with a probability that depends on its answer (inversely to the finding's prevalence), so every
  question is answered "yes" about half of the time and the question alone cannot tell the answer;
* open: which side the effusion / pneumothorax is on, which lobe the opacity is in, how many devices are
  visible (asked more often for rarer counts).

Questions are drawn from ``numpy.random.default_rng((seed, "vqa", image id))``: deterministic per image.
Splits are by patient (``--val-fraction`` / ``--test-fraction``).
"""
from __future__ import annotations

import argparse
import zlib
from collections.abc import Iterator

import numpy as np

from data_prep import synthetic
from data_prep.adapters.vqa import pack_rows
from unimlip_train.format.rows import Row

add_arguments = synthetic.add_arguments

# (question, presence test on the findings dict, prevalence of "yes" in data_prep.synthetic.sample_findings)
CLOSED = (
    ("Is there a pleural effusion?", lambda f: bool(f["effusion"]), 0.35),
    ("Is the heart enlarged?", lambda f: f["cardiomegaly"], 0.30),
    ("Is there a pneumothorax?", lambda f: bool(f["pneumothorax"]), 0.12),
    ("Is there an opacity in the right lung?", lambda f: bool(f["opacity"]) and f["opacity"][0].startswith("right"),
     0.55 * 3 / 5),
    ("Is there an opacity in the left lung?", lambda f: bool(f["opacity"]) and f["opacity"][0].startswith("left"),
     0.55 * 2 / 5),
    ("Is a pacemaker present?", lambda f: "pacemaker" in f["devices"], 0.15),
)
#: A closed question is asked with probability SCALE / P(its answer): "yes" and "no" equally often.
SCALE = min(p for *_, p in CLOSED)
#: Probability of asking the device count, by count: the common 0 and 1 less often than the rare counts.
COUNT_ASK = {0: 0.2, 1: 0.27}


def questions(findings: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs about one image's findings (``synthetic.Findings.as_dict()``)."""
    out = []
    for text, present, prevalence in CLOSED:
        yes = present(findings)
        if rng.random() < SCALE / (prevalence if yes else 1.0 - prevalence):
            out.append((text, "yes" if yes else "no"))
    if findings["effusion"]:
        out.append(("Which side is the pleural effusion on?", findings["effusion"][0]))
    if findings["pneumothorax"]:
        out.append(("Which side is the pneumothorax on?", findings["pneumothorax"][0]))
    if findings["opacity"]:
        out.append(("Which lobe is the opacity in?", findings["opacity"][0]))
    count = len(findings["devices"])
    if rng.random() < COUNT_ASK.get(count, 1.0):
        out.append(("How many devices are visible?", str(count)))
    return out


def _records(images: Iterator[Row], seed: int) -> Iterator[tuple[str, dict]]:
    for row in images:
        rng = np.random.default_rng((seed, zlib.crc32(b"vqa"), zlib.crc32(row.id.encode())))
        for i, (question, answer) in enumerate(questions(row.metadata["findings"], rng)):
            yield row.id, {"image": row.image, "image_name": row.id, "group": row.group, "qid": f"{row.id}-q{i}",
                           "image_meta": {"findings": row.metadata["findings"], "view": row.metadata["view"]},
                           "question": question, "answer": answer,
                           "answer_type": "CLOSED" if answer in ("yes", "no") else "OPEN"}


def iter_rows(args: argparse.Namespace) -> Iterator[Row]:
    """The synthetic images (``data_prep.synthetic.iter_rows``), each with its questions; an image that drew no
    question is left out."""
    return pack_rows(_records(synthetic.iter_rows(args), args.seed), "synthetic-vqa")
