"""Zero-shot classification: class prompts from YAML -> class embeddings -> scores -> metrics.

A class embedding is the mean of its L2-normalised prompt embeddings, renormalised (prompt ensembling as in
CLIP). Single-label mode picks the class with the highest cosine similarity; multi-label mode (CheXpert-style,
one binary decision per class) compares each class's positive prompts with its negative ("no {}") prompts.

Single-label mode can also report *calibrated* accuracies: before the argmax, each class's logit is shifted by
its mean over unlabelled calibration images (e.g. the training split's), so that no class wins merely because
its prompts sit closer to every image. This is the label-free class-prior correction of "Calibrate Before Use"
(Zhao et al., ICML 2021) applied to images instead of a content-free input; it assumes the calibration images'
class mix is not far from uniform. It never uses a label, and the AUROC (a ranking) is the uncalibrated one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from . import metrics

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "prompts" / "chest_xray.yaml"
# Logit scale for turning cosine similarities into class probabilities (CLIP's trained value); it only
# affects how single-label per-class AUROC weighs the other classes, never the predicted class.
ZEROSHOT_SCALE = 100.0


def normalise_name(name: str) -> str:
    """Compare class names and sample labels case-, underscore- and spacing-insensitively."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


@dataclass
class PromptSet:
    """Templates and per-class prompt specs read from a prompt YAML (see unimlip_train/resources/prompts/chest_xray.yaml)."""

    templates: list[str] = field(default_factory=lambda: ["{}."])
    negative_templates: list[str] = field(default_factory=list)
    classes: dict[str, dict] = field(default_factory=dict)

    def _spec(self, name: str) -> dict:
        return self.classes.get(normalise_name(name), {})

    def positive(self, name: str) -> list[str]:
        """Prompts describing the presence of class ``name``: its own sentences plus its names in the templates.

        A class with explicit ``prompts`` and no ``names`` uses just those sentences; an unknown class uses its
        own name in the templates.
        """
        spec = self._spec(name)
        names = list(spec.get("names", [])) or ([] if spec.get("prompts") else [normalise_name(name)])
        return list(spec.get("prompts", [])) + [t.format(n) for n in names for t in self.templates]

    def negative(self, name: str) -> list[str]:
        """Prompts describing the absence of class ``name`` (multi-label mode)."""
        spec = self._spec(name)
        names = list(spec.get("names", [])) or ([] if spec.get("negative_prompts") else [normalise_name(name)])
        out = list(spec.get("negative_prompts", [])) + [t.format(n) for n in names for t in self.negative_templates]
        if not out:
            raise ValueError(f"multi-label zero-shot needs negative prompts for class {name!r}: add "
                             "'negative_templates' or the class's 'negative_prompts' to the prompt file")
        return out


def load_prompts(path: str | Path = "") -> PromptSet:
    """Read a prompt YAML; ``""`` is the packaged chest X-ray set."""
    path = Path(path) if path else DEFAULT_PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping with templates / negative_templates / classes")
    unknown = set(data) - {"templates", "negative_templates", "classes"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    classes = {}
    for name, spec in (data.get("classes") or {}).items():
        spec = spec or {}
        bad = set(spec) - {"names", "prompts", "negative_prompts"} if isinstance(spec, dict) else {"<not a mapping>"}
        if bad:
            raise ValueError(f"{path}: class {name!r}: unknown keys {sorted(bad)} (names, prompts, negative_prompts)")
        classes[normalise_name(name)] = spec
    templates = list(data.get("templates") or ["{}."])
    for t in templates + list(data.get("negative_templates") or []):
        if "{}" not in t:
            raise ValueError(f"{path}: template {t!r} has no '{{}}' placeholder")
    return PromptSet(templates, list(data.get("negative_templates") or []), classes)


@torch.no_grad()
def embed_prompt_ensemble(encode_text, tokenizer, prompts: Sequence[str], max_length: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean of the normalised prompt embeddings, renormalised (1 x D)."""
    tok = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    emb = encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0, keepdim=True)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def class_embeddings(encode_text, tokenizer, class_names: Sequence[str], prompts: PromptSet, max_length: int,
                     negative: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """C x D class embeddings (positive prompts, or the negative ones for multi-label mode)."""
    rows = [embed_prompt_ensemble(encode_text, tokenizer, prompts.negative(c) if negative else prompts.positive(c),
                                  max_length, device) for c in class_names]
    return torch.cat(rows, dim=0)


def zeroshot_scores(image_emb: torch.Tensor, positive: torch.Tensor,
                    negative: torch.Tensor | None = None, calibration_emb: torch.Tensor | None = None) -> torch.Tensor:
    """N x C scores: one-vs-rest log-odds (single-label) or positive-minus-negative logits (multi-label).

    ``calibration_emb`` (M x D unlabelled images, single-label only): subtract each class's mean logit over them
    first (see the module docstring).
    """
    logits = ZEROSHOT_SCALE * image_emb.double() @ positive.double().T
    if negative is None:
        if calibration_emb is not None:
            logits = logits - (ZEROSHOT_SCALE * calibration_emb.double() @ positive.double().T).mean(dim=0)
        return metrics.one_vs_rest_log_odds(logits)
    if calibration_emb is not None:
        raise ValueError("calibrated zero-shot is single-label only (a per-class mean says nothing about a "
                         "finding's prevalence)")
    return logits - ZEROSHOT_SCALE * image_emb.double() @ negative.double().T


def label_targets(labels: Sequence[Sequence[str]], class_names: Sequence[str],
                  multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Targets and a keep-mask from per-sample label lists.

    Single-label: the index of the one class among the sample's labels; samples with none or several of the
    classes are dropped (keep False). Multi-label: an N x C 0/1 matrix, every sample kept.
    """
    wanted = [normalise_name(c) for c in class_names]
    hits = np.zeros((len(labels), len(wanted)), dtype=bool)
    for i, sample_labels in enumerate(labels):
        present = {normalise_name(x) for x in sample_labels}
        hits[i] = [c in present for c in wanted]
    if multi_label:
        return hits.astype(np.int64), np.ones(len(labels), dtype=bool)
    keep = hits.sum(axis=1) == 1
    return hits.argmax(axis=1), keep


def zeroshot_evaluate(image_emb: torch.Tensor, labels: Sequence[Sequence[str]], encode_text, tokenizer,
                      class_names: Sequence[str], prompts: PromptSet, max_length: int, multi_label: bool = False,
                      device: torch.device | str = "cpu",
                      calibration_emb: torch.Tensor | None = None) -> dict[str, float]:
    """Zero-shot metrics of images (N x D, normalised) against prompted classes; adds ``skipped`` samples.

    With ``calibration_emb`` (unlabelled images, single-label mode) also ``calibrated_accuracy`` and
    ``calibrated_balanced_accuracy``: the same decisions after the class-prior correction.
    """
    if len(class_names) < 2 and not multi_label:
        raise ValueError("single-label zero-shot needs at least two classes")
    positive = class_embeddings(encode_text, tokenizer, class_names, prompts, max_length, device=device)
    negative = (class_embeddings(encode_text, tokenizer, class_names, prompts, max_length, negative=True,
                                 device=device) if multi_label else None)
    targets, keep = label_targets(labels, class_names, multi_label)
    if not keep.any():
        raise ValueError(f"no sample carries exactly one of the classes {list(class_names)} in its labels")
    scores = zeroshot_scores(image_emb[torch.from_numpy(keep)], positive, negative)
    fn = metrics.multi_label_metrics if multi_label else metrics.single_label_metrics
    out = fn(scores, targets[keep], class_names)
    if calibration_emb is not None:
        calibrated = fn(zeroshot_scores(image_emb[torch.from_numpy(keep)], positive, negative, calibration_emb),
                        targets[keep], class_names)
        out.update({f"calibrated_{k}": calibrated[k] for k in ("accuracy", "balanced_accuracy")})
    out["skipped"] = float((~keep).sum())
    return out
