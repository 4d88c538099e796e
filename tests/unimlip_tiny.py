"""Tiny Uni-Mlip setups shared by the model and loss tests: a written vocab, a CPU-sized config, batches."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertTokenizer

from unimlip_train.config.schema import Config

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NUM_WORDS = 59
IMAGE_SIZE = 32


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    """A WordPiece tokenizer over 5 special tokens and words w0..w58, written to ``folder/vocab.txt``."""
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(SPECIAL + [f"w{i}" for i in range(NUM_WORDS)]) + "\n")
    return BertTokenizer(vocab=str(path))


def tiny_config(dropout: float = 0.0, **weights: float) -> Config:
    """ViT depth 2 / width 64 / patch 8 at 32 px, 1 channel, and a 2-layer width-64 BERT; all terms on
    unless ``weights`` says otherwise. ``dropout`` sets every perturbation: the feature dropout, BERT's
    dropouts, the ViT's patch dropout and stochastic depth of the feature-level passes."""
    cfg = Config()
    cfg.data.image_size = IMAGE_SIZE
    cfg.data.in_chans = 1
    cfg.model.image.kwargs = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8)
    cfg.model.text.config = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    cfg.model.embed_dim = 32
    cfg.model.ssl_embed_dim = 32
    cfg.model.feature_dropout = dropout
    cfg.model.text.dropout = cfg.model.image.token_drop = cfg.model.image.spatial_drop = dropout
    cfg.model.fusion.layers = 1
    cfg.model.fusion.heads = 2
    for name, weight in weights.items():
        getattr(cfg.loss, name).weight = weight
    return cfg


def random_batch(n: int, length: int, generator: torch.Generator, reports: int = 0, groups: int = 0,
                 label_sets: int = 0) -> dict:
    """A full training batch (every key any term needs) of random images and token ids. Identities: every
    sample its own report, group and label set, or ``reports`` / ``groups`` / ``label_sets`` distinct ids drawn at
    random (duplicates)."""
    ids = torch.randint(len(SPECIAL), len(SPECIAL) + NUM_WORDS, (n, length), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, -2:] = 0  # some padded reports
    ids[: n // 2, -2:] = 0
    view2 = ids.clone()
    view2[:, 1:4] = view2[:, 1:4].flip(1)
    masked = torch.rand(n, length, generator=generator) < 0.3
    masked[:, 0] = False
    masked &= mask.bool() & (ids > 3)
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return {
        "image": torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "image_view2": torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
        "text_view2_ids": view2,
        "text_view2_mask": mask.clone(),
        "mlm_input_ids": torch.where(masked, torch.full_like(ids, 4), ids),
        "mlm_labels": labels,
        "report_id": torch.randint(reports, (n,), generator=generator) if reports else torch.arange(n),
        "group_id": torch.randint(groups, (n,), generator=generator) if groups else torch.arange(n) + 1000,
        "label_id": torch.randint(label_sets, (n,), generator=generator) if label_sets else torch.arange(n) + 2000,
    }
