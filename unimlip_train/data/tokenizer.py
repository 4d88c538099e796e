"""Tokenizer loading: the packaged synthetic-report vocabulary, a local folder, or a cached hub name.

Nothing is downloaded at run time on the clusters this targets (``HF_HUB_OFFLINE=1``): a hub name must
already be in the local Hugging Face cache, and the error says so instead of a bare connection failure.
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

#: The default tokenizer: WordPiece trained on the synthetic report vocabulary, shipped with the package.
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "resources" / "synthetic_tokenizer"


def load_tokenizer(name_or_path: str = "") -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer: ``""`` = packaged default, else a local folder or a (cached) hub name."""
    target = str(DEFAULT_TOKENIZER_DIR) if not name_or_path else os.path.expanduser(name_or_path)
    if not name_or_path and not DEFAULT_TOKENIZER_DIR.is_dir():
        raise FileNotFoundError(f"packaged default tokenizer missing: {DEFAULT_TOKENIZER_DIR} (reinstall the package)")
    # hub ids contain a slash too ("org/model"): only an explicit path or an existing folder counts as local
    looks_local = target.startswith((".", os.path.sep)) or os.path.exists(target)
    if looks_local and not os.path.isdir(target):
        raise FileNotFoundError(f"tokenizer folder not found: {target}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as e:
        hint = "" if looks_local else " (hub names must already be in the local Hugging Face cache: runs are offline)"
        raise OSError(f"cannot load tokenizer {target!r}{hint}: {e}") from None
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {target!r} has no pad token; batches need one")
    return tokenizer
