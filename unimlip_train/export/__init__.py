"""A trained checkpoint for its users: ``load_for_eval`` (the model, config and tokenizer back in memory), the
safetensors export (``export``) and the open_clip export (``export_open_clip``).

Evaluation, fine-tuning and the ablation read checkpoints through this package, never through the training
engine: it re-exports the few checkpoint facts they need (``resolve_checkpoint``, ``read_state``,
``CheckpointError``) from ``unimlip_train.engine.checkpoint``, which it builds on for consolidation.
"""
from unimlip_train.engine.checkpoint import CheckpointError, read_state, resolve_checkpoint
from unimlip_train.export.load import load_for_eval
from unimlip_train.export.open_clip_export import OpenClipIncompatible, export_open_clip
from unimlip_train.export.weights import export

__all__ = ["CheckpointError", "OpenClipIncompatible", "export", "export_open_clip", "load_for_eval", "read_state",
           "resolve_checkpoint"]
