"""Training engine: the DeepSpeed loop (trainer) and the one start-up sequence of a job (run), step checkpoints
(checkpoint/), the log window (telemetry), periodic evaluation through a given callable (validation),
non-finite steps and corrupt data (health), the metrics sinks (monitor), optimizer/schedule (optim), the
generated DeepSpeed config (ds_config), the signal-set stop flag (preemption) and the run dir lock (run_lock)."""
