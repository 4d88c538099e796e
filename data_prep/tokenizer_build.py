"""Train a WordPiece vocabulary on the reports of a shard set and save a BERT-style tokenizer folder.

For offline sites with no pretrained tokenizer: the folder loads with
``transformers.AutoTokenizer.from_pretrained(dir)`` (``config.json`` names ``model_type: bert``) and with
``BertTokenizer(vocab=dir + "/vocab.txt")``. Every printable ASCII character is kept in the vocabulary both
as a word start and as a ``##`` continuation, so words never seen in training split into pieces instead of
becoming ``[UNK]``.
"""
from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers

from data_prep.verify import iter_samples, load_index
from unimlip_train.format.report_text import report_body
from unimlip_train.format.rows import InputError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def shard_paths(data_dir: str | Path, split: str = "train") -> list[Path]:
    """Shards of ``split`` ('all': every split) listed in ``index.json``, else every ``*.tar`` in the folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"--data {root}: no such directory")
    if not (root / "index.json").is_file():
        paths = sorted(root.glob("*.tar"))
    else:
        splits = load_index(root)["splits"]
        if split != "all" and split not in splits:
            raise InputError(f"{root / 'index.json'}: no split {split!r} (has {', '.join(splits)})")
        chosen = splits if split == "all" else {split: splits[split]}
        paths = [root / s["name"] for info in chosen.values() for s in info["shards"]]
    if not paths:
        raise InputError(f"--data {root}: no shards found")
    return paths


def iter_reports(paths: Iterable[Path]) -> Iterator[str]:
    """The reports as the model reads them, section headers aside (``report_body``)."""
    for path in paths:
        for _, sample in iter_samples(path):
            if "txt" in sample:
                yield report_body(sample["txt"].decode("utf-8", errors="replace"))


def train_vocab(texts: Iterable[str], vocab_size: int) -> list[str]:
    """WordPiece vocabulary (BERT normalisation, lower case): special tokens, the ASCII alphabet, then words.

    Deterministic on purpose: the ``tokenizers`` WordPiece trainer breaks ties between equally frequent
    merges by hash-map order, which differs between processes, so two runs on identical shards gave
    different vocabularies (and different token ids for the same checkpoint). Here whole words are ranked
    by (frequency, then spelling) and taken until ``vocab_size``; any other word is split by WordPiece's
    greedy longest match into known pieces, down to single characters, so nothing becomes ``[UNK]``.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = list(SPECIAL_TOKENS) + [t for c in _ALPHABET for t in (c, "##" + c)]
    present = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in present:
            vocab.append(word)
            present.add(word)
    return vocab


def save_tokenizer(vocab: list[str], out_dir: str | Path, model_max_length: int = 512) -> Path:
    """Write vocab.txt, the transformers tokenizer files, special_tokens_map.json and config.json."""
    from transformers import BertTokenizer  # deferred: heavy (about a second to import), only this step needs it

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(out))
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    config = {"model_type": "bert", "vocab_size": len(vocab), "max_position_embeddings": model_max_length}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def build_tokenizer(data_dir: str | Path, out_dir: str | Path, vocab_size: int = 4000, split: str = "train") -> int:
    """Train on a shard set's reports and save the folder; returns the vocabulary size."""
    paths = shard_paths(data_dir, split)
    vocab = train_vocab(iter_reports(paths), vocab_size)
    save_tokenizer(vocab, out_dir)
    return len(vocab)
