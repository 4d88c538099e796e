"""Training engine: DeepSpeed loop (trainer), step checkpoints (checkpoint), telemetry (monitor),
optimizer/schedule (optim), the generated DeepSpeed config (ds_config) and the signal-set stop flag
(preemption)."""
from unimlip_train.engine.trainer import NonFiniteLossError, TrainResult, train

__all__ = ["train", "TrainResult", "NonFiniteLossError"]
