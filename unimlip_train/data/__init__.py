"""Data path on the training side: shard sources, report text, augmentation, tokenizer, streaming loader."""
from unimlip_train.data.collate import BatchNeeds, batch_needs
from unimlip_train.data.eval_loader import build_eval_loader
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.tokenizer import load_tokenizer

__all__ = ["BatchNeeds", "TrainStream", "batch_needs", "build_eval_loader", "load_tokenizer"]
