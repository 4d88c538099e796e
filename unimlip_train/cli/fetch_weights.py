"""``unimlip-fetch-weights CONFIG --out DIR``: download a config's pretrained towers on a connected machine, so an
offline cluster can load them from local folders.

Writes ``DIR/image`` (timm's hub layout: ``config.json`` with the pretrained config, i.e. the normalisation and
input size, and ``model.safetensors``) for ``model.image.pretrained: hub``, and ``DIR/text`` (the Hugging Face
model and its tokenizer, ``save_pretrained``) for a hub id in ``model.text.name``; then prints, as its last line,
the overrides that point the config at those folders. Towers that are already local are left alone.
"""
from __future__ import annotations

import argparse
import os
import sys

from unimlip_train.cli.args import parse_with_overrides

EPILOG = """example:
  unimlip-fetch-weights configs/vitb16_biomedbert.yaml --out /shared/models/vitb16_biomedbert
  unimlip-train --config configs/vitb16_biomedbert.yaml ... <the overrides it printed>"""


def is_local(name: str) -> bool:
    """A path (relative, absolute, home) or an existing folder, as opposed to a hub id such as ``org/model``."""
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def fetch_image(name: str, out: str) -> str:
    """timm's weights of the tag in ``name`` (from the hub) saved in timm's hub layout under ``out``."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(name, pretrained=True)
    save_for_hf(model, out, safe_serialization=True)
    return out


def fetch_text(name: str, tokenizer: str, out: str) -> str:
    """A Hugging Face model and its tokenizer (``tokenizer``, default the model's) saved under ``out``."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(name).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer or name).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unimlip-fetch-weights", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config (YAML) naming the pretrained towers")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for image/ and text/ (created)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for unimlip-train")
    args = parse_with_overrides(p, argv)  # overrides anywhere on the line, as for unimlip-train
    from unimlip_train.config.load import load_config
    from unimlip_train.config.origins import ConfigError
    from unimlip_train.models.pretrained import HUB, resolve_towers

    try:
        cfg = load_config(args.config, args.overrides, resolve=resolve_towers)
    except ConfigError as e:
        p.exit(2, f"unimlip-fetch-weights: config error: {e}\n")
    icfg, tcfg = cfg.model.image, cfg.model.text
    overrides = []
    try:
        if icfg.pretrained == HUB:
            image_dir = fetch_image(icfg.name, os.path.join(os.path.abspath(args.out), "image"))
            print(f"model.image: timm {icfg.name} -> {image_dir}", flush=True)
            overrides.append(f"model.image.pretrained={image_dir}")
        if tcfg.name and not is_local(tcfg.name):
            text_dir = fetch_text(tcfg.name, cfg.model.tokenizer, os.path.join(os.path.abspath(args.out), "text"))
            print(f"model.text: {tcfg.name} -> {text_dir}", flush=True)
            overrides += [f"model.text.name={text_dir}", f"model.tokenizer={text_dir}"]
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"unimlip-fetch-weights: cannot download ({reason}); run it on a machine with internet access "
              "(and without HF_HUB_OFFLINE=1)", file=sys.stderr)
        return 1
    if not overrides:
        print("nothing to fetch: the config's towers are random-init or local already")
        return 0
    print(" ".join(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
