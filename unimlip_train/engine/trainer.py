"""The training loop: DeepSpeed engine, exact resume, agreed stopping, non-finite skipping, telemetry.

``Trainer`` is split into the steps a reader looks for: ``build`` (process group, model, engine, stream),
``resume``, ``train_step`` (one optimizer step of ``grad_accum`` micro batches, each a
``forward_backward_step``), ``log_step``, ``evaluate_step`` and ``checkpoint_step``; ``run`` strings them
together. What they lean on lives beside this file: ``checkpoint/`` (saving, integrity, consolidation),
``telemetry`` (the log window and its scalars), ``validation`` (periodic evaluation through the ``validate``
callable the trainer is given; the engine never imports ``unimlip_train.eval``), ``health/`` (non-finite steps,
corrupt data; the hang watchdog, the loss-spike rollback, stragglers and fault injection behind the
``self.health`` hooks), ``optim`` (groups, schedule, clamping) and ``run`` (the one start-up sequence of a job).

Every decision that changes control flow (stop requested, checkpoint due, step skipped, rollback) is the same on
every rank, so no rank ever waits in a collective the others skipped.

No host synchronisation per micro step: the loss terms are summed on the device and read once per
``train.log_every``; a non-finite loss or gradient is caught by DeepSpeed's own gradient-overflow check
(ZeRO 1-3), which skips the optimizer step on every rank. Without ZeRO (stage 0) no such check exists, and
the trainer reads a device-side finiteness flag once per optimizer step instead. The loss-spike guard reads one
loss per step, a step late, from pinned memory it was copied to without blocking (``health.guard``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

import unimlip_train.distributed.process_group as du
import unimlip_train.engine.checkpoint as ck
from unimlip_train.config.load import dump_yaml
from unimlip_train.config.schema import Config
from unimlip_train.config.validate import derive_grad_accum
from unimlip_train.data.collate import batch_needs
from unimlip_train.data.loader import TrainStream
from unimlip_train.data.tokenizer import load_tokenizer
from unimlip_train.data.transforms import normalisation
from unimlip_train.engine.ds_config import build_ds_config
from unimlip_train.engine.health.guard import TrainingHealth
from unimlip_train.engine.health.limits import (
    CorruptDataError,
    NonFiniteSteps,
    drop_gradients_unless_finite,
)
from unimlip_train.engine.health.rollback import roll_back
from unimlip_train.engine.health.watchdog import collective_timeout_s
from unimlip_train.engine.monitor import Monitor
from unimlip_train.engine.optim import (
    build_optimizer,
    build_scheduler,
    clamp_parameter_,
    follow_config_schedule,
    param_groups,
)
from unimlip_train.engine.telemetry import SampleKeyLog, StepWindow, summary
from unimlip_train.engine.validation import PeriodicValidation, Validate, asks_for_validation
from unimlip_train.losses.objective import AccumulationCache, UniMlipObjective
from unimlip_train.models.build import TrainStep, build_model
from unimlip_train.models.norm_stats import frozen_running_stats


@dataclass
class TrainResult:
    status: Literal["finished", "preempted"]
    step: int


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device (asynchronously from pinned memory); floating inputs to the engine's compute
    dtype (bf16/fp16 params need it)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _model_prefix(step_module: torch.nn.Module, model: torch.nn.Module) -> str:
    for name, child in step_module.named_children():
        if child is model:
            return name + "."
    raise RuntimeError("TrainStep does not hold the model as a direct submodule")


class Trainer:
    """One training run in ``run_dir``: build it, then ``run()``.

    ``resume``: 'auto' (latest complete checkpoint here, if any), 'none', or a checkpoint path.
    ``stop_requested()`` true on any rank makes ``run`` checkpoint collectively and return 'preempted'.
    ``validate``: the periodic evaluation (``validation.Validate``, e.g. ``unimlip_train.eval.validate_with_examples``);
    required when the config asks for one (``train.eval_every`` and ``data.val``).
    ``on_hang``: what the hang watchdog runs before the job ends hung (``health.watchdog``; SLURM requeues there).
    """

    def __init__(self, cfg: Config, run_dir: str, resume: str = "auto",
                 stop_requested: Optional[Callable[[], bool]] = None, validate: Optional[Validate] = None,
                 on_hang: Optional[Callable[[], Optional[str]]] = None):
        self.cfg, self.run_dir, self.stop_requested = cfg, run_dir, stop_requested
        self.validate, self.on_hang = validate, on_hang
        self.build(resume)
        self.resume()

    # ------------------------------------------------------------------------------------------ build
    def build(self, resume: str) -> None:
        """Process group, run dir, model, DeepSpeed engine, data stream; finds the checkpoint to resume."""
        import deepspeed  # deepspeed: heavy (and CUDA-probing), imported when an engine is built

        cfg, run_dir = self.cfg, self.run_dir
        self.rank, self.world, self.local_rank = du.init_distributed(
            cfg.deepspeed.backend, collective_timeout_s(cfg.train.hang_timeout_s))
        if cfg.train.global_batch_size:  # the accumulation that keeps the global batch at this world size
            cfg.train.grad_accum = derive_grad_accum(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                                     self.world)
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        os.makedirs(run_dir, exist_ok=True)
        if self.rank == 0:
            with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump_yaml(cfg))
            with open(os.path.join(run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
                json.dump(build_ds_config(cfg, self.world), f, indent=1)
        self.manager = ck.CheckpointManager(run_dir, cfg.train.keep_checkpoints)

        # Which checkpoint, if any: decided before building, because a world-size change loads weights pre-engine.
        self.source = None
        if resume == "auto":
            self.source = self.manager.latest()
        elif resume != "none":
            self.source = ck.resolve_checkpoint(resume)
        self.saved = ck.read_state(self.source) if self.source else None
        # Steps after the checkpoint that a killed run already logged are hidden in TensorBoard (purge_step).
        self.monitor = Monitor(run_dir, self.rank == 0, cfg.train.steps,
                               purge_step=self.saved.step + 1 if self.saved else None,
                               wandb_settings=cfg.monitor.wandb, run_config=cfg.to_dict(),
                               normalisation=normalisation(cfg.data))

        torch.manual_seed(cfg.seed)  # identical init on every rank (ZeRO-3 partitions each rank's own copy)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.text.name)
        self.model = build_model(cfg, self.tokenizer)
        if self.saved is not None:
            ck.check_compatible(self.source, cfg, self.model)  # one message naming the keys, not a size mismatch
        step_module = TrainStep(self.model, UniMlipObjective(cfg))
        self.same_layout = (self.saved is not None and self.saved.format == ck.DEEPSPEED
                            and self.saved.world_size == self.world and self.saved.zero_stage == cfg.deepspeed.zero_stage)
        # DeepSpeed's own files only load into the layout that wrote them; otherwise the consolidated state does:
        # the weights now, the optimizer's master weights, moments and steps once the engine exists (``resume``).
        self.carried = None
        if self.saved is not None and not self.same_layout:
            weights, self.carried = ck.read_for_reshard(self.source)
            self.model.load_state_dict(weights, strict=True)
        if cfg.train.compile:
            self.model.image_tower.compile(backend=cfg.train.compile_backend)
            self.model.text_tower.compile(backend=cfg.train.compile_backend)
        self.fresh_param_groups = lambda: param_groups(step_module, self.model, cfg)
        self.optimizer = build_optimizer(self.fresh_param_groups(), cfg)
        names = {id(p): n for n, p in step_module.named_parameters()}
        optimizer_params = [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler,
                                                    config=build_ds_config(cfg, self.world), dist_init_required=False)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout / feature noise differ per rank
        self.stream = TrainStream(cfg, self.tokenizer, batch_needs(cfg.loss), self.rank, self.world)
        self.state = ck.TrainerState(world_size=self.world, zero_stage=cfg.deepspeed.zero_stage,
                                     config_hash=cfg.hash(), model_prefix=_model_prefix(step_module, self.model),
                                     optimizer_params=optimizer_params)
        self.compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision,
                                                                                torch.float32)
        self.accumulate = cfg.train.grad_accum > 1 and cfg.train.negatives == "accumulated"
        # ZeRO's optimizers skip a step whose gradients are not finite (and count it); without ZeRO we check.
        self.own_finite_check = cfg.deepspeed.zero_stage == 0
        self.validation = PeriodicValidation(self.validate, cfg, self.tokenizer, self.device, self.compute_dtype)

    # ----------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Counters, engine, lr schedule, data position and RNG from ``self.source`` (when there is one)."""
        saved, state, cfg, source = self.saved, self.state, self.cfg, self.source
        if saved is None:
            return
        state.step, state.samples_seen, state.nonfinite_total = saved.step, saved.samples_seen, saved.nonfinite_total
        state.rollbacks, state.rollback_skipped, state.loss_history = saved.rollbacks, saved.rollback_skipped, \
            list(saved.loss_history)  # the spike guard's counters and window
        if saved.config_hash != state.config_hash:
            self.monitor.event(f"note: resuming {source} written with a different config (hash "
                               f"{saved.config_hash} -> {state.config_hash}); continuing with the new config")

        def read_stream(rank: int) -> dict:  # the stream reads the other ranks' states only at another layout
            return ck.read_rank_state(source, rank)["stream"]

        if self.same_layout:
            ck.load_engine(self.engine, source)
            follow_config_schedule(self.scheduler, self.fresh_param_groups(), cfg, state.step)
            self.stream.resume(read_stream, saved.world_size)
            ck.set_rng_state(ck.read_rank_state(source, self.rank)["rng"])
            if self.stream.resharded is None:
                self.monitor.event(f"resumed from {source} at step {state.step} ({state.samples_seen} samples seen)")
                return
        else:
            if self.carried is not None:
                ck.load_into(self.engine, self.carried, state.model_prefix)
            follow_config_schedule(self.scheduler, self.fresh_param_groups(), cfg, state.step)
            self.stream.resume(read_stream, saved.world_size)
            ck.set_rng_state(ck.rank_rng(source, saved.world_size, self.rank, cfg.seed, state.step))
        self._announce_reshard()

    def _announce_reshard(self) -> None:
        """The one line of a resume at another layout (ranks, ZeRO stage, loader units), also an event line in
        metrics.jsonl with its numbers."""
        saved, state, recut, cfg = self.saved, self.state, self.stream.resharded, self.cfg
        kept = self.same_layout or self.carried is not None
        moments = ("optimizer moments kept" if kept else "optimizer moments restart (a stage-0 checkpoint from before "
                   "this version does not name its optimizer's parameters)")
        record = {"event": "reshard", "step": state.step, "from_ranks": saved.world_size,
                  "from_zero_stage": saved.zero_stage, "to_ranks": self.world, "to_zero_stage": cfg.deepspeed.zero_stage,
                  "moments_kept": kept, "source": self.source}
        if recut is not None:
            data = (f"{recut['remaining']} samples of epoch {recut['epoch']} remaining, spread over "
                    f"{self.world} × {self.stream.workers} loader units")
            record.update(epoch=recut["epoch"], remaining_samples=recut["remaining"], loader_units=self.world *
                          self.stream.workers, workers=self.stream.workers)
        else:
            data = f"the data stream continues at epoch {self.stream.epoch}"
        self.monitor.event(f"resumed {self.source} at step {state.step}: from {saved.world_size} ranks / ZeRO "
                           f"{saved.zero_stage} to {self.world} ranks / ZeRO {cfg.deepspeed.zero_stage}, {moments}, "
                           f"{data}", record)

    # ------------------------------------------------------------------------------------------- loop
    def start(self) -> None:
        """The loop's own state: counters, telemetry window, the batch iterator (``run`` calls it)."""
        self.start_step = self.state.step
        self.last_saved = self.state.step if self.saved is not None else -1
        self.last_saved_time = time.time()
        self.nonfinite = NonFiniteSteps(self.cfg.train.max_nonfinite_in_row)
        self.window = StepWindow()  # what log_step reports: the logged terms' sums, throughput, data wait
        self.sample_log = SampleKeyLog.if_requested(self.run_dir, self.rank, self.start_step)
        self.batches = iter(self.stream)
        self.engine.train()
        self.health = TrainingHealth(self.cfg, self.run_dir, self.state, self.rank, self.world, self.device,
                                     self.on_hang, on_fire=getattr(self.stop_requested, "mute", None))
        self.health.start(self.start_step)  # collective: arms the hang watchdog

    def run(self) -> TrainResult:
        """Train until ``train.steps`` or a stop request; checkpoints at the end either way."""
        cfg, state = self.cfg, self.state
        if self.validate is None and asks_for_validation(cfg):
            raise ValueError(f"train.eval_every={cfg.train.eval_every} with data.val set asks for periodic evaluation, "
                             "but the trainer was given no validate callable (pass "
                             "validate=unimlip_train.eval.validate_with_examples)")
        self.start()
        try:
            while True:
                stop, due = self._agree_stop_and_due()
                if self.health.spike is not None:  # confirmed on every rank alike
                    roll_back(self, self.health.spike)
                    continue
                if due and state.step > self.start_step:  # the first step boundary after train.checkpoint_minutes
                    self.checkpoint_step(force=True)
                if stop or state.step >= cfg.train.steps:
                    if state.step != self.last_saved:
                        self.checkpoint_step(force=True)
                    if self.health.spike is not None and not stop:  # the last steps diverged: train them again
                        continue
                    self._summary("preempted" if stop else "finished")
                    if stop:
                        saved = "checkpointed" if state.step == self.last_saved else \
                            f"the latest checkpoint is step {self.last_saved} (a loss spike is pending)"
                        self.monitor.event(f"stop requested at step {state.step}: {saved}, exiting as preempted")
                        return TrainResult("preempted", state.step)
                    return TrainResult("finished", state.step)
                self.train_step()
                self.log_step()
                self.picture_step()
                self.evaluate_step()
                self.checkpoint_step()
        finally:
            self.health.close()  # a hang watchdog that fired ends the process itself (exit status 4)
            self.batches.close()  # the loader's workers stop in good order (they ignore SIGTERM and SIGINT)
            if self.sample_log is not None:
                self.sample_log.close()
            self.monitor.close()

    def _agree_stop_and_due(self) -> tuple[bool, bool]:
        """Whether any rank was asked to stop, and whether a time-based checkpoint is due (rank clocks differ,
        so both are agreed through the CPU control group)."""
        minutes = self.cfg.train.checkpoint_minutes
        due = minutes > 0 and time.time() - self.last_saved_time >= 60 * minutes
        stop = bool(self.stop_requested and self.stop_requested())
        flags = self.health.agree([float(stop), float(due)])  # all_reduce_max_many, the spike guard's loss with it
        return flags[0] > 0, flags[1] > 0

    # ------------------------------------------------------------------------------------- train step
    def _next_micro_batches(self) -> list[dict]:
        """The optimizer step's ``grad_accum`` micro batches, on the device."""
        batches = []
        for micro in range(self.cfg.train.grad_accum):
            t = time.time()
            self.health.before_batch()
            with torch.random.fork_rng(devices=[]):  # the stream (DataLoader seeding) must not shift dropout RNG
                batch = next(self.batches)
            self.window.wait += time.time() - t
            self.health.saw(self.state.step + 1, batch["key"])
            global_micro = self.cfg.train.micro_batch_size * self.world
            self.state.samples_seen += global_micro
            self.window.samples += global_micro
            if self.sample_log is not None:
                self.sample_log.write(self.state.step + 1, batch["key"], self.stream.last_epoch)
            batches.append(_to_device(batch, self.device, self.compute_dtype))
        return batches

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def forward_backward_step(self, batch: dict, micro_step: int, cache=None) -> torch.Tensor:
        """One micro batch: forward (model + objective) and backward (gradients accumulate in the engine).
        Returns a device flag, True when the loss was finite; the logs are summed on the device."""
        self.health.crumb("forward: the embedding all-gathers of the contrastive terms")
        loss, logs = self.engine(batch, micro_step, cache=cache)
        self.health.add_loss(loss, self.cfg.train.grad_accum)
        self.health.crumb("backward: the gradient reduction")
        self.engine.backward(loss)
        self.window.add_terms(logs, self.cfg.train.grad_accum)
        return torch.isfinite(loss.detach())

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro batches. With ``train.negatives=accumulated`` a
        gradient-free pass first caches every micro batch's contrastive embeddings, and each micro batch is
        then recomputed with its random state replayed (see ``losses.objective``)."""
        state, k_steps = self.state, self.cfg.train.grad_accum
        self.health.before_step(state.step + 1, self.optimizer)  # fault injection (UNIMLIP_FAULT_*)
        batches = self._next_micro_batches()
        self.step_batch = batches[0]
        entries, rng = None, None
        if self.accumulate:
            entries, rng = [], []
            with torch.no_grad(), frozen_running_stats(self.model):  # the recompute updates BatchNorm once
                for batch in batches:
                    rng.append(self._rng_state())
                    entries.append(self.engine(batch, 0, embed_only=True))
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for micro, batch in enumerate(batches):
            cache = None
            if entries is not None:
                self._set_rng_state(rng[micro])
                cache = AccumulationCache(entries, micro)
            # The ITM negatives' noise is seeded per micro batch, so accumulated micro batches differ.
            finite &= self.forward_backward_step(batch, state.step * k_steps + micro, cache)
            if self.own_finite_check and micro == k_steps - 1:
                finite = drop_gradients_unless_finite(finite, self.model, self.world)
            self.health.crumb("optimizer step (ZeRO partition exchange)")
            self.engine.step()
        self.model.clamp_logit_scale_(clamp_parameter_)
        state.step += 1
        self.health.after_step(state.step)  # a hang-watchdog beat; the loss copied to the host without waiting
        self.window.steps += 1
        skipped = not bool(finite) if self.own_finite_check else getattr(self.engine, "skipped_steps", 0) > skipped_before
        self.nonfinite.count(skipped, state, self.monitor, self.manager.latest)

    # -------------------------------------------------------------------------------------- telemetry
    def log_step(self) -> None:
        """Every ``train.log_every`` steps (and the last): the one host read of the summed terms, logged as
        their means over the steps since the last log."""
        cfg, state = self.cfg, self.state
        if state.step % cfg.train.log_every and state.step != cfg.train.steps:
            return
        self.health.crumb("log step: the logged terms' mean over ranks (all_reduce)")
        scalars, skips = self.window.scalars(self.engine, self.optimizer, self.stream, state, self.world)
        scalars.update(self.health.rank_times(self.window.t0, self.window.steps, self.window.wait))  # stragglers
        self.monitor.log_train(state.step, scalars, self.start_step)
        self.window.reset()
        if message := skips.exceeded(cfg.data.max_skip_fraction):
            self.checkpoint_step(force=True)
            self._summary("corrupt_data")
            raise CorruptDataError(f"{message}; checkpointed at step {state.step}")

    def _summary(self, status: str) -> None:
        """The run's last line in metrics.jsonl (and the console): status, step, the skipped steps and samples."""
        self.monitor.log_summary(self.state.step, summary(status, self.state, self.stream))

    def picture_step(self) -> None:
        """TensorBoard grid of the augmented view pairs: at the first step of a launch and every
        ``train.image_every`` steps."""
        every = self.cfg.train.image_every
        if self.state.step == self.start_step + 1 or (every > 0 and self.state.step % every == 0):
            self.monitor.log_views(self.state.step, self.step_batch)

    def evaluate_step(self) -> None:
        """Every ``train.eval_every`` steps (and the last): retrieval / zero-shot on ``data.val``."""
        if not self.validation.due(self.state.step):
            return
        self.health.crumb("evaluation (embedding gathers)")
        metrics, examples = self.validation(self.model, self.rank, self.world)
        self.health.progress(self.state.step)
        self.monitor.log_val(self.state.step, metrics)
        self.monitor.log_retrieval_examples(self.state.step, examples)

    def checkpoint_step(self, force: bool = False) -> None:
        """Every ``train.checkpoint_every`` steps, when ``force``d (end, stop, time-based), never twice."""
        cfg, state = self.cfg, self.state
        every = cfg.train.checkpoint_every > 0 and state.step % cfg.train.checkpoint_every == 0
        if not (force or every) or state.step == self.last_saved:
            return
        if self.health.holds_checkpoint(state.step, self.monitor.event):  # a loss spike is pending
            return
        self.health.crumb("checkpoint save (DeepSpeed's writes, then the completion agreement)")
        self.manager.save(self.engine, state, self.stream, cfg, self.tokenizer)
        self.health.checkpointed(state.step, self.last_saved)
        self.last_saved, self.last_saved_time = state.step, time.time()
        self.monitor.event(f"checkpoint step {state.step} -> {self.manager.dir}")


def train(cfg: Config, run_dir: str, resume: str = "auto", stop_requested: Optional[Callable[[], bool]] = None,
          validate: Optional[Validate] = None, on_hang: Optional[Callable[[], Optional[str]]] = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (see ``Trainer``); returns 'finished', or 'preempted' after a collective
    checkpoint when ``stop_requested()`` became true on any rank."""
    return Trainer(cfg, run_dir, resume, stop_requested, validate, on_hang).run()
