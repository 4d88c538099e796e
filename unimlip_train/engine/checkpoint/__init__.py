"""Step checkpoints that are complete or invisible, exact resume, and consolidated fp32 weights.

Layout of ``run_dir/checkpoints``::

    step_0000100/               one DeepSpeed tag (model + optimizer + scheduler states, every rank's shards)
        trainer_rank00000.pt    per-rank: data-stream position and RNG states (torch.save, tensors/ints only)
        trainer_state.json      rank 0, written last: step, samples seen, world size, config hash (the marker)
        config.yaml, tokenizer/ so the tag alone can be evaluated or exported
    latest                      the tag of the newest *complete* checkpoint, replaced atomically

Order of a save: every rank writes its DeepSpeed shards and its rank file, the ranks agree that all of them
succeeded, then rank 0 writes ``trainer_state.json`` and only then moves ``latest`` (temp file + os.replace).
A job killed anywhere before that leaves ``latest`` on the previous checkpoint; DeepSpeed's own ``latest``
file is never written (``save_latest=False``).

``trainer_state.json`` also records every file of the checkpoint with its size and the model's parameter
shapes, so a checkpoint damaged later (a truncated or deleted file) is recognised before anything loads it:
``--resume auto`` falls back to the newest older intact checkpoint and says which one it skipped, an
explicit path is a one-line error. A write that fails (a full disk, a quota) fails on every rank together:
the partial checkpoint is removed, ``latest`` is untouched, and the message names the path and the space.

The modules, bottom up: ``state`` (names, the trainer state, RNG and rank states), ``integrity`` (file
records, complete / damaged / newest intact tag, reading a tag's state, model compatibility), ``save``
(``CheckpointManager``: guarded writes, the completion marker, pruning), ``optimizer_state`` (Adam's state of
any ZeRO stage as full per-parameter tensors, and the consolidated files), ``consolidate`` (fp32 weights of any
ZeRO stage and world size), ``reshard`` (a checkpoint into an engine of another layout; the offline reshard),
``describe`` (what a tag holds). Loading a checkpoint for evaluation and exporting it live in
``unimlip_train.export``.
"""
from unimlip_train.engine.checkpoint.consolidate import consolidated_state_dict
from unimlip_train.engine.checkpoint.integrity import (
    check_compatible,
    damage,
    file_records,
    is_complete,
    latest_pointer,
    newest_complete,
    read_state,
    resolve_checkpoint,
)
from unimlip_train.engine.checkpoint.reshard import load_into, rank_rng, read_for_reshard
from unimlip_train.engine.checkpoint.save import FAULT_ENV, CheckpointManager
from unimlip_train.engine.checkpoint.state import (
    CONSOLIDATED,
    DEEPSPEED,
    LATEST,
    STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    TrainerState,
    load_engine,
    parameter_shapes,
    read_rank_state,
    rng_state,
    set_rng_state,
    shape_differences,
    tag_for,
)

__all__ = ["CONSOLIDATED", "DEEPSPEED", "FAULT_ENV", "LATEST", "STATE_FILE", "CheckpointError", "CheckpointManager",
           "CheckpointWriteError", "TrainerState", "check_compatible", "consolidated_state_dict", "damage",
           "file_records", "is_complete", "latest_pointer", "load_engine", "load_into", "newest_complete",
           "parameter_shapes", "rank_rng", "read_for_reshard", "read_rank_state", "read_state", "resolve_checkpoint",
           "rng_state", "set_rng_state", "shape_differences", "tag_for"]
