"""Production model sizes for benchmarks, with nothing downloaded: timm ViT-B/16 at 224 px and a randomly
initialised BERT-base (12 layers, width 768, 12 heads) with BERT's 30,522-token vocabulary, on the production
config (``configs/vitb16_biomedbert.yaml``: projection MLPs, 4 fusion layers, every Uni-Mlip term on)."""
from __future__ import annotations

import json
from pathlib import Path

PRODUCTION_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "vitb16_biomedbert.yaml")
BERT_VOCAB_SIZE = 30522
TERMS = ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl", "text_feature", "mlm", "itm")
#: The CLIP-only objective: the cross-modal data-level term alone.
CLIP_ONLY = [f"loss.{t}.weight=0" for t in TERMS if t != "itc"]


def write_bert_sized_tokenizer(folder: Path, size: int = BERT_VOCAB_SIZE) -> str:
    """A WordPiece tokenizer folder with BERT's special tokens and ``size`` entries in all (the MLM head's
    output width and the embedding table then have BERT-base's sizes); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + [f"w{i}" for i in range(size - len(special))]) + "\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return str(folder)


def production_overrides(tokenizer_dir: str, text_length: int, batch: int) -> list[str]:
    """Overrides of the production config: random-init ViT (``model.image.pretrained=``: the weights change no
    cost and nothing may download) and BERT-base (``model.text.name=`` and BertConfig's defaults), the given
    tokenizer, text length and micro batch, no evaluation, no checkpoints."""
    return ["model.image.pretrained=", "model.text.name=", "model.text.config={}", f"model.tokenizer={tokenizer_dir}",
            f"data.text.max_length={text_length}", f"train.micro_batch_size={batch}", "data.val=",
            "train.eval_every=0", "train.checkpoint_every=0"]
