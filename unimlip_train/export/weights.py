"""``unimlip-export --format safetensors``: a checkpoint as one consolidated fp32 ``model.safetensors`` with its
``config.yaml`` and ``tokenizer/``, which ``load_for_eval`` reads back without DeepSpeed; with ``--optimizer`` also
the Adam state: ``optimizer.safetensors`` (``NAME.exp_avg``, ``NAME.exp_avg_sq`` for every trainable parameter,
fp32, NAME as in ``model.safetensors``) and ``optimizer.json`` (each group's step, betas, lr and parameters)."""
from __future__ import annotations

import os
import shutil

from safetensors.torch import save_file

from unimlip_train.engine.checkpoint import (
    CheckpointError,
    consolidated_state_dict,
    read_for_reshard,
    read_state,
    resolve_checkpoint,
)
from unimlip_train.engine.checkpoint.optimizer_state import write_consolidated


def export(checkpoint: str, out: str, optimizer: bool = False) -> str:
    """Write ``model.safetensors`` (consolidated fp32) + ``config.yaml`` + ``tokenizer/`` into ``out`` (with
    ``optimizer``: the optimizer files too)."""
    path = resolve_checkpoint(checkpoint)
    metadata = {"source": os.path.abspath(path), "step": str(read_state(path).step)}
    if optimizer:
        weights, state = read_for_reshard(path)
        if state is None:
            raise CheckpointError(f"{path}: a stage-0 checkpoint written before this version does not name its "
                                  "optimizer state's parameters; export it without --optimizer")
        write_consolidated(out, weights, state, metadata)
    else:
        weights = consolidated_state_dict(path)
        os.makedirs(out, exist_ok=True)
        # Clones: tied weights share storage, which safetensors refuses to serialise twice.
        save_file({k: v.detach().clone().contiguous() for k, v in weights.items()},
                  os.path.join(out, "model.safetensors"), metadata=metadata)
    shutil.copyfile(os.path.join(path, "config.yaml"), os.path.join(out, "config.yaml"))
    shutil.copytree(os.path.join(path, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    return out
