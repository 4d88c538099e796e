"""Data path on the training side: shard sources, report text, augmentation, tokenizer, streaming loader."""
