"""Retrieval examples for people to look at: a few validation images with the reports the model ranks first.

Metrics say how often retrieval works; a handful of concrete queries shows *how* it fails (a normal study
matched to another normal report is a different failure from a pneumonia matched to a fracture). Correct
means the same report identity as the evaluation metrics use (``duplicate_groups``), so a verbatim copy of the
true report counts as a hit here exactly as it does in R@K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unimlip_train.eval.embed import EmbeddedSet
from unimlip_train.eval.metrics import duplicate_groups


@dataclass
class RetrievalExample:
    """One image query: its report and the top-k retrieved reports as ``(report, cosine, correct)``."""

    key: str
    image: torch.Tensor  # C x H x W, normalised as the model saw it
    report: str
    top: list[tuple[str, float, bool]]
    set_name: str = ""  # which validation set ('' when there is one)

    @property
    def hit(self) -> bool:
        """Whether the true report (or a verbatim duplicate of it) is among the retrieved ones."""
        return any(correct for _, _, correct in self.top)


def retrieval_examples(emb: EmbeddedSet, images: dict[str, torch.Tensor], k: int = 3,
                       set_name: str = "") -> list[RetrievalExample]:
    """Image-to-report retrieval over the whole set ``emb`` for each image in ``images`` (key -> tensor)."""
    row = {key: i for i, key in enumerate(emb.keys)}
    groups = duplicate_groups(emb.texts)
    out = []
    for key, image in images.items():
        if key not in row:  # outside emb (e.g. cut by eval.max_samples)
            continue
        i = row[key]
        sims = emb.text @ emb.image[i]
        scores, idx = sims.topk(min(k, len(emb.keys)))
        top = [(emb.texts[j], float(s), bool(groups[j] == groups[i])) for s, j in zip(scores.tolist(), idx.tolist())]
        out.append(RetrievalExample(key, image, emb.texts[i], top, set_name))
    return out
