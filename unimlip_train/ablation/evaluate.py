"""Score one checkpoint for the ablation table, with exactly the metrics ``unimlip-eval`` computes.

Retrieval on the eval split; when its samples carry labels, zero-shot classification on the same split (also
calibrated on the training shards' images, single-label) and a linear probe fitted on the training shards'
split and scored on it. The eval split is embedded once and shared by all three. The result is cached in the
run dir (``ablation_eval.json``) with what it was computed from (the checkpoint's identity, the evaluation
settings and code), so an unchanged checkpoint is never scored twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import unimlip_train.eval as eval_package
from unimlip_train.ablation.table import json_safe
from unimlip_train.eval.card import build_card, data_identity, index_of
from unimlip_train.eval.embed import embed_split, model_device
from unimlip_train.eval.linear_probe import linear_probe
from unimlip_train.eval.metrics import retrieval_metrics
from unimlip_train.eval.zeroshot import DEFAULT_PROMPTS, label_targets, load_prompts, zeroshot_evaluate
from unimlip_train.export import load_for_eval
from unimlip_train.format.shards import sha256_file

CACHE = "ablation_eval.json"


@dataclass
class EvalSpec:
    """How every checkpoint of one ablation is evaluated (identical for all rows)."""

    data: str  # eval shards (dir / index.json / pattern)
    split: str = "val"
    probe_data: str = ""  # linear-probe fitting shards ('' : no probe)
    probe_split: str = "train"
    classes: list = field(default_factory=list)  # [] : every single label found in the eval split
    prompts: str = ""  # '' : the packaged chest X-ray prompts
    label_key: str = "labels"
    multi_label: bool = False
    batch_size: int = 64
    workers: Optional[int] = None  # data loader workers (None: the checkpoint config's)

    def fingerprint(self) -> dict:
        """The settings plus the content hashes of the files they name: a changed file re-evaluates."""
        out = dataclasses.asdict(self)
        out["eval_code_sha256"] = eval_code_sha256()
        out["prompts_sha256"] = sha256_file(self.prompts or str(DEFAULT_PROMPTS))
        for key in ("data", "probe_data"):
            index = index_of(getattr(self, key)) if getattr(self, key) else None
            out[f"{key}_index_sha256"] = sha256_file(index) if index else ""
        return out


def eval_code_sha256() -> str:
    """One hash of the evaluation code (``unimlip_train/eval`` and this module): metrics cached by other code
    are recomputed, so a fixed metric never lingers in a table."""
    files = sorted(Path(eval_package.__file__).parent.glob("*.py")) + [Path(__file__)]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def checkpoint_fingerprint(checkpoint: str) -> dict:
    """What makes a checkpoint this one: its path, its trainer state and when that state was written."""
    state = os.path.join(checkpoint, "trainer_state.json")
    return {"path": os.path.abspath(checkpoint), "state": Path(state).read_text(encoding="utf-8"),
            "mtime_ns": os.stat(state).st_mtime_ns}


def single_label_classes(labels: list[list[str]]) -> list[str]:
    """Every label that some sample carries alone (``unimlip-eval linear-probe``'s default class set)."""
    return sorted({lab[0] for lab in labels if len(lab) == 1})


def evaluate_checkpoint(checkpoint: str, spec: EvalSpec) -> tuple[dict[str, float], dict]:
    """``(metrics, card)``. Metrics in percent: retrieval keys as ``unimlip-eval retrieval`` prints them, then
    ``zeroshot/...`` and ``linear_probe/...`` when the eval split carries at least two classes; the card is
    ``unimlip-eval``'s provenance card for all of them. Raises ValueError on unusable data."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints; stdout is the caller's
        model, cfg, tokenizer = load_for_eval(checkpoint)
    if spec.workers is not None:
        cfg.data.num_workers = spec.workers
    model = model.to(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")).eval()

    def embed(source: str, split: str):
        return embed_split(model, cfg, tokenizer, source, split, 0, 1, spec.batch_size, label_key=spec.label_key)

    emb = embed(spec.data, spec.split)
    out = retrieval_metrics(emb.image, emb.text, emb.texts)
    splits, samples = {"eval": spec.split}, {"eval": len(emb.keys)}

    def card(prompts: Optional[str]) -> dict:
        data = data_identity(spec.data, splits)
        if "probe" in samples:
            data["probe"] = data_identity(spec.probe_data, {"fit": spec.probe_split})
        return build_card("unimlip-ablate", checkpoint, cfg, data, samples, None, prompts=prompts)  # no sampling

    classes = list(spec.classes) or single_label_classes(emb.labels)
    if len(classes) < 2 and not (spec.multi_label and classes):
        return out, card(None)  # no labels (or one class): retrieval only
    fit = embed(spec.probe_data, spec.probe_split) if spec.probe_data else None
    # Zero-shot is also calibrated on the fitting split's images (their labels unused), unimlip-eval zeroshot
    # --calibration-data PROBE_DATA --calibration-split PROBE_SPLIT.
    zs = zeroshot_evaluate(emb.image, emb.labels, model.encode_text, tokenizer, classes, load_prompts(spec.prompts),
                           cfg.data.text.max_length, multi_label=spec.multi_label, device=model_device(model),
                           calibration_emb=fit.image if fit is not None and not spec.multi_label else None)
    out.update({f"zeroshot/{k}": v for k, v in zs.items()})
    if fit is not None and len(classes) >= 2:
        parts, keeps = [], []
        for part in (fit, emb):
            y, keep = label_targets(part.labels, classes, multi_label=False)
            parts += [part.image[torch.from_numpy(keep)], y[keep]]
            keeps.append(keep)
        # The L2 penalty is chosen on whole groups (patients) carved from the fitting split, as unimlip-eval does.
        groups = [g for g, k in zip(fit.groups, keeps[0]) if k]
        probe = linear_probe(*parts, classes, train_groups=groups)
        out.update({f"linear_probe/{k}": v for k, v in probe.items()})
        samples["probe"] = len(fit.keys)
    return out, card(spec.prompts)


def cached_metrics(run_dir: Path, checkpoint: str, spec: EvalSpec) -> Optional[tuple[dict, dict]]:
    """The cached ``(metrics, card)`` when computed from this very checkpoint with these settings."""
    path = run_dir / CACHE
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if cached.get("checkpoint") != checkpoint_fingerprint(checkpoint) or cached.get("spec") != spec.fingerprint():
        return None
    return {k: float("nan") if v is None else v for k, v in cached["metrics"].items()}, cached["card"]


def store_metrics(run_dir: Path, checkpoint: str, spec: EvalSpec, metrics: dict, card: dict) -> None:
    """Write the cache atomically (a crash never leaves a half file that would be trusted)."""
    doc = {"checkpoint": checkpoint_fingerprint(checkpoint), "spec": spec.fingerprint(),
           "metrics": json_safe([metrics])[0], "card": card}
    tmp = run_dir / f"{CACHE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / CACHE)


def evaluate_run(run_dir: Path, checkpoint: str, spec: EvalSpec) -> tuple[dict, dict, bool]:
    """``(metrics, card, computed_now)``: the cache when it matches, else a fresh evaluation (then cached)."""
    cached = cached_metrics(run_dir, checkpoint, spec)
    if cached is not None:
        return *cached, False
    metrics, card = evaluate_checkpoint(checkpoint, spec)
    store_metrics(run_dir, checkpoint, spec, metrics, card)
    return metrics, card, True
