"""Periodic validation during training: retrieval and zero-shot on ``data.val``. ``validate_with_examples`` is
what ``unimlip-train`` and the SLURM job hand the trainer (the engine never imports this package): every rank
calls it and every rank gets the same dict (embeddings are gathered everywhere, metrics computed identically)."""
from __future__ import annotations

from typing import Any

from unimlip_train.eval.embed import EmbeddedSet, embed_split
from unimlip_train.eval.examples import RetrievalExample, retrieval_examples
from unimlip_train.eval.metrics import retrieval_metrics
from unimlip_train.eval.zeroshot import load_prompts, zeroshot_evaluate


def val_sources(cfg) -> list[tuple[str, str, str]]:
    """``(name, path, split)`` for each configured validation set; ``cfg.data.val`` is a path or a list of
    paths / ``{path, split}`` mappings (the split defaults to ``cfg.eval.split``)."""
    entries = cfg.data.val if isinstance(cfg.data.val, list) else [cfg.data.val] if cfg.data.val else []
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            path, split = entry, cfg.eval.split
        else:
            get = entry.get if isinstance(entry, dict) else lambda k, d=None: getattr(entry, k, d)
            path, split = get("path", ""), get("split", None) or cfg.eval.split
        if not path:
            raise ValueError(f"data.val entry {i} has no path")
        out.append((f"val{i}" if len(entries) > 1 else "", path, split))
    return out


def evaluate_embedded(emb: EmbeddedSet, model, cfg, tokenizer) -> dict[str, float]:
    """Retrieval metrics, plus ``zeroshot/...`` metrics when ``cfg.eval.classes`` is set."""
    out = retrieval_metrics(emb.image, emb.text, emb.texts)
    if cfg.eval.classes:
        prompts = load_prompts(cfg.eval.prompts)
        device = next(model.parameters()).device
        zs = zeroshot_evaluate(emb.image, emb.labels, model.encode_text, tokenizer, list(cfg.eval.classes),
                               prompts, cfg.data.text.max_length, multi_label=cfg.eval.multi_label,
                               device=device)
        out.update({f"zeroshot/{k}": v for k, v in zs.items()})
    return out


def validate(model: Any, cfg, tokenizer, rank: int, world_size: int) -> dict[str, float]:
    """Evaluate on every set in ``cfg.data.val``; ``{}`` when none is configured. Call on all ranks.

    ``model`` may be the bare ``UniMlip`` or a wrapper exposing it as ``.module`` (DeepSpeed engine, DDP).
    Training mode is restored afterwards.
    """
    return validate_with_examples(model, cfg, tokenizer, rank, world_size, num_examples=0)[0]


def validate_with_examples(model: Any, cfg, tokenizer, rank: int, world_size: int, num_examples: int = 4,
                           k: int = 3) -> tuple[dict[str, float], list[RetrievalExample]]:
    """``validate``, plus up to ``num_examples`` image queries per validation set with their top-``k``
    retrieved reports (taken from the first images this rank embedded: rank 0's are the ones to log)."""
    sources = val_sources(cfg)
    if not sources:
        return {}, []
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    out: dict[str, float] = {}
    examples: list[RetrievalExample] = []
    try:
        for name, path, split in sources:
            emb = embed_split(module, cfg, tokenizer, path, split, rank, world_size,
                              batch_size=cfg.train.micro_batch_size, max_samples=cfg.eval.max_samples,
                              label_key=cfg.eval.label_key, previews=num_examples)
            prefix = f"{name}/" if name else ""
            out.update({prefix + key: v for key, v in evaluate_embedded(emb, module, cfg, tokenizer).items()})
            examples += retrieval_examples(emb, emb.previews, k, name)
    finally:
        module.train(was_training)
    return out, examples
