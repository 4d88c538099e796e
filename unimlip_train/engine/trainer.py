"""The training loop: DeepSpeed engine, exact resume, agreed stopping, non-finite skipping, telemetry.

One optimizer step = ``grad_accum`` finite micro batches per rank. Every decision that changes control flow
(stop requested, loss non-finite) is agreed on by all ranks with an all-reduce, so no rank ever waits in a
collective the others skipped.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist

from unimlip_train import distributed as du
from unimlip_train.config import Config, dump_yaml
from unimlip_train.engine import checkpoint as ck
from unimlip_train.engine.ds_config import build_ds_config
from unimlip_train.engine.monitor import Monitor, gpu_memory_gib
from unimlip_train.engine.optim import WarmupCosine, build_optimizer, build_scheduler, group_lrs, param_groups

# Debug aid for exactness checks: when set to 1, each rank appends the sample keys of every micro batch to
# run_dir/debug/sample_keys.rank{R}.jsonl as {"start": first step of this launch, "step": step, "keys": [...]}.
SAMPLE_LOG_ENV = "UNIMLIP_LOG_SAMPLE_KEYS"


@dataclass
class TrainResult:
    status: Literal["finished", "preempted"]
    step: int


class NonFiniteLossError(RuntimeError):
    """Raised (on every rank) after ``train.max_nonfinite_in_row`` consecutive non-finite losses."""


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device; floating inputs to the engine's compute dtype (bf16/fp16 params need it)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over ranks (same key order on every rank: sorted)."""
    keys = sorted(values)
    world = du.get_world_size()
    if world == 1:
        return {k: values[k] for k in keys}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _model_prefix(step_module: torch.nn.Module, model: torch.nn.Module) -> str:
    for name, child in step_module.named_children():
        if child is model:
            return name + "."
    raise RuntimeError("TrainStep does not hold the model as a direct submodule")


def _fast_forward(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a fresh LambdaLR at ``step`` without stepping an optimizer (world-size-change resume)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _follow_config_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, groups: list[dict], cfg: Config,
                            step: int) -> None:
    """A resumed run follows *this* config's lr, warm-up, length, weight decay and betas: loading the engine
    restored the saved ones with the optimizer and scheduler state, so ``train.steps=600`` on a run saved at
    300 of 300 would otherwise train at the final lr. With an unchanged config nothing changes. ``groups`` are
    built afresh from the config (``param_groups``), in the optimizer's group order."""
    for group, fresh in zip(scheduler.optimizer.param_groups, groups):
        group.update(weight_decay=fresh["weight_decay"], betas=tuple(cfg.train.betas))
    scheduler.base_lrs = [g["lr"] for g in groups]
    scheduler.lr_lambdas = [WarmupCosine(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
                            for _ in groups]
    _fast_forward(scheduler, step)


def _validate(model, eval_copy, cfg: Config, tokenizer, rank: int, world: int, autocast) -> dict[str, float]:
    """Periodic evaluation on every rank. Under ZeRO-3 the weights are gathered once into ``eval_copy``, a plain
    model without DeepSpeed's hooks: eval forwards through the hooked modules (a different module order than
    the recorded training trace, uneven per-rank batch counts) leave the ranks' parameter fetches out of step."""
    from unimlip_train.eval import validate

    if eval_copy is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            eval_copy.load_state_dict({k: v.detach() for k, v in model.state_dict().items()})
        model = eval_copy
    with torch.no_grad(), autocast:
        return validate(model, cfg, tokenizer, rank, world)


def train(cfg: Config, run_dir: str, resume: str = "auto",
          stop_requested: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; ``resume``: 'auto' (latest complete checkpoint here, if any), 'none',
    or a checkpoint path. Returns 'preempted' after a collective checkpoint when ``stop_requested()`` became
    true on any rank."""
    import deepspeed

    from unimlip_train.data.loader import TrainStream, batch_needs
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.models import TrainStep, build_model
    from unimlip_train.losses import UniMlipObjective

    rank, world, local_rank = du.init_distributed(cfg.deepspeed.backend)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_yaml(cfg))
        with open(os.path.join(run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
            json.dump(build_ds_config(cfg, world), f, indent=1)
    manager = ck.CheckpointManager(run_dir, cfg.train.keep_checkpoints)

    # Which checkpoint, if any: decided before building, because a world-size change loads weights pre-engine.
    source = None
    if resume == "auto":
        source = manager.latest()
    elif resume != "none":
        source = ck.resolve_checkpoint(resume)
    saved = ck.read_state(source) if source else None
    # Steps after the checkpoint that a killed run already logged are hidden in TensorBoard (purge_step).
    monitor = Monitor(run_dir, rank == 0, cfg.train.steps, purge_step=saved.step + 1 if saved else None)

    torch.manual_seed(cfg.seed)  # identical init on every rank (ZeRO-3 partitions each rank's own copy)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.text.name)
    model = build_model(cfg, tokenizer)
    step_module = TrainStep(model, UniMlipObjective(cfg))
    prefix = _model_prefix(step_module, model)
    # DeepSpeed's own files only load into the layout that wrote them; otherwise the consolidated weights do.
    same_world = (saved is not None and saved.world_size == world
                  and saved.zero_stage == cfg.deepspeed.zero_stage)
    if saved is not None and not same_world:
        model.load_state_dict(ck.consolidated_state_dict(source), strict=True)
    if cfg.train.compile:
        model.image_tower.compile()
        model.text_tower.compile()
    optimizer = build_optimizer(param_groups(step_module, model, cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(cfg, world), dist_init_required=False)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout / feature noise differ per rank
    stream = TrainStream(cfg, tokenizer, batch_needs(cfg.loss), rank, world)

    state = ck.TrainerState(world_size=world, zero_stage=cfg.deepspeed.zero_stage, config_hash=cfg.hash(),
                            model_prefix=prefix)
    if saved is not None:
        state.step, state.samples_seen, state.nonfinite_total = saved.step, saved.samples_seen, saved.nonfinite_total
        if saved.config_hash != state.config_hash:
            monitor.event(f"note: resuming {source} written with a different config (hash {saved.config_hash} "
                          f"-> {state.config_hash}); continuing with the new config")
        if same_world:
            ck.load_engine(engine, source)
            _follow_config_schedule(scheduler, param_groups(step_module, model, cfg), cfg, state.step)
            rank_state = ck.read_rank_state(source, rank)
            stream.load_state_dict(rank_state["stream"])
            ck.set_rng_state(rank_state["rng"])
            monitor.event(f"resumed from {source} at step {state.step} ({state.samples_seen} samples seen); "
                          "data stream continues where it stopped")
        else:
            _fast_forward(scheduler, state.step)
            stream.load_state_dict(ck.read_rank_state(source, 0)["stream"], strict=False)
            monitor.event(
                f"resumed from {source} at step {state.step}, but the layout changed ({saved.world_size} -> "
                f"{world} ranks, ZeRO {saved.zero_stage} -> {cfg.deepspeed.zero_stage}): model weights come from the consolidated fp32 state, "
                "the optimizer moments start fresh, the lr schedule continues at this step, and the data stream "
                f"cannot continue mid-epoch (per-rank positions do not remap): it restarts at the beginning of "
                f"epoch {stream.epoch}.")

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    eval_autocast = (torch.autocast("cuda", dtype=autocast_dtype) if cuda and autocast_dtype != torch.float32
                     else torch.autocast("cpu", enabled=False))
    sample_log = None
    if os.environ.get(SAMPLE_LOG_ENV) == "1":
        os.makedirs(os.path.join(run_dir, "debug"), exist_ok=True)
        sample_log = open(os.path.join(run_dir, "debug", f"sample_keys.rank{rank}.jsonl"), "a", encoding="utf-8")

    start_step = state.step
    global_micro = cfg.train.micro_batch_size * world
    last_saved = state.step if saved is not None else -1
    nonfinite_in_row = 0
    eval_copy = None
    window = {"t0": time.time(), "wait": 0.0, "samples": 0}
    sums: dict[str, float] = {}
    it = iter(stream)
    engine.train()
    try:
        while True:
            stop = du.all_reduce_max(bool(stop_requested and stop_requested())) > 0
            if stop or state.step >= cfg.train.steps:
                if state.step != last_saved:
                    manager.save(engine, state, stream, cfg, tokenizer)
                    monitor.event(f"checkpoint step {state.step} -> {manager.dir}")
                if stop:
                    monitor.event(f"stop requested: checkpointed at step {state.step}, exiting as preempted")
                    return TrainResult("preempted", state.step)
                return TrainResult("finished", state.step)

            micro = 0
            while micro < cfg.train.grad_accum:
                t = time.time()
                with torch.random.fork_rng(devices=[]):  # the stream (DataLoader seeding) must not shift dropout RNG
                    batch = next(it)
                window["wait"] += time.time() - t
                state.samples_seen += global_micro
                window["samples"] += global_micro
                if sample_log is not None:
                    sample_log.write(json.dumps({"start": start_step, "step": state.step + 1,
                                                 "keys": list(batch["key"])}) + "\n")
                    sample_log.flush()
                # The ITM negatives' noise is seeded per micro batch, so accumulated micro batches differ.
                micro_step = state.step * cfg.train.grad_accum + micro
                loss, logs = engine(_to_device(batch, device, autocast_dtype), micro_step)
                if du.all_reduce_max(0.0 if math.isfinite(loss.item()) else 1.0) > 0:
                    state.nonfinite_total += 1
                    nonfinite_in_row += 1
                    monitor.event(f"step {state.step + 1}: non-finite loss on some rank; micro batch skipped "
                                  f"({nonfinite_in_row} in a row, {state.nonfinite_total} in total)")
                    if nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_row} non-finite losses in a row at step {state.step + 1} "
                            f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); stopping. Lower "
                            f"train.lr, check the data, or resume from {manager.latest()}")
                    continue
                nonfinite_in_row = 0
                engine.backward(loss)
                engine.step()
                micro += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float().item()) / cfg.train.grad_accum
            state.step += 1

            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                scalars = _mean_over_ranks(sums)
                elapsed = max(time.time() - window["t0"], 1e-9)
                gn = engine.get_global_grad_norm()
                scalars.update({f"lr/{g}": lr for g, lr in group_lrs(optimizer).items()})
                scalars.update(samples_per_s=window["samples"] / elapsed,
                               samples_per_s_per_gpu=window["samples"] / elapsed / world,
                               data_wait_frac=min(1.0, window["wait"] / elapsed),
                               skipped_steps=float(state.nonfinite_total + getattr(engine, "skipped_steps", 0)),
                               samples_seen=float(state.samples_seen))
                if gn is not None:
                    scalars["grad_norm"] = float(gn)
                if (mem := gpu_memory_gib()) is not None:
                    scalars["gpu_mem_gib"] = mem
                monitor.log_train(state.step, scalars, start_step)
                window = {"t0": time.time(), "wait": 0.0, "samples": 0}
            sums = {}

            if cfg.train.eval_every > 0 and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.steps):
                if cfg.data.val:
                    # Evaluation must not consume the training RNG, or resumed runs would diverge.
                    with torch.random.fork_rng(devices=[local_rank] if cuda else []):
                        if cfg.deepspeed.zero_stage == 3 and eval_copy is None:
                            eval_copy = build_model(cfg, tokenizer).to(device)
                        metrics = _validate(model, eval_copy, cfg, tokenizer, rank, world, eval_autocast)
                    monitor.log_val(state.step, metrics)
            if cfg.train.checkpoint_every > 0 and state.step % cfg.train.checkpoint_every == 0:
                manager.save(engine, state, stream, cfg, tokenizer)
                last_saved = state.step
                monitor.event(f"checkpoint step {state.step} -> {manager.dir}")
    finally:
        if sample_log is not None:
            sample_log.close()
        monitor.close()
