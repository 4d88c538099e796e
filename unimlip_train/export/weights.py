"""``unimlip-export --format safetensors``: a checkpoint as one consolidated fp32 ``model.safetensors`` with its
``config.yaml`` and ``tokenizer/``, which ``load_for_eval`` reads back without DeepSpeed."""
from __future__ import annotations

import os
import shutil

from safetensors.torch import save_file

from unimlip_train.engine.checkpoint import consolidated_state_dict, read_state, resolve_checkpoint


def export(checkpoint: str, out: str) -> str:
    """Write ``model.safetensors`` (consolidated fp32) + ``config.yaml`` + ``tokenizer/`` into ``out``."""
    path = resolve_checkpoint(checkpoint)
    weights = consolidated_state_dict(path)
    os.makedirs(out, exist_ok=True)
    # Clones: tied weights share storage, which safetensors refuses to serialise twice.
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"),
              metadata={"source": os.path.abspath(path), "step": str(read_state(path).step)})
    shutil.copyfile(os.path.join(path, "config.yaml"), os.path.join(out, "config.yaml"))
    shutil.copytree(os.path.join(path, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    return out
