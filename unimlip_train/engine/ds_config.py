"""The DeepSpeed config, generated from the typed Config so it is never kept by hand in a second place."""
from __future__ import annotations

import torch

from unimlip_train.config.schema import Config


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed JSON config for ``cfg`` at ``world_size`` data-parallel ranks.

    The optimizer and scheduler are client objects (see ``engine.optim``), so none is declared here.
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Export consolidates from the fp32 partitions (checkpoint/optimizer_state.py), so skip the 16-bit gather on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # Our optimizers are torch AdamW or DeepSpeed's own Adams; all are ZeRO-safe.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        # Reduce and accumulate gradients in fp32: DeepSpeed 0.19 otherwise does both in bf16 (8-bit mantissa).
        # (ZeRO 1-3 only: DeepSpeed 0.19 refuses fp32 accumulation of bf16 gradients without ZeRO.)
        config["communication_data_type"] = "fp32"
        if ds.zero_stage >= 1:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config
