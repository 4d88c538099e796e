"""Data path on the training side: shard sources, report text, augmentation, tokenizer, streaming loader."""
import os

# albumentations asks the package index for a newer version when it is imported, unless told not to: training
# downloads nothing at run time (and clusters are often offline). Set here, before any data module imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
