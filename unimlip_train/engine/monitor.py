"""Training telemetry: TensorBoard scalars and pictures, ``metrics.jsonl``, an optional Weights & Biases
mirror and a console progress line (rank 0 only).

TensorBoard is what users watch; metrics.jsonl is what scripts and tests read (one JSON object per logged
step, loss terms under their config names). Pictures show what numbers hide: the augmented view pairs the
model is trained on, and validation images with the reports it retrieves for them.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Any, Optional, Sequence

import torch

from unimlip_train.data.transforms import MEAN, STD

#: The W&B run id of a run dir: a requeued or resumed job reads it and continues the same W&B run.
WANDB_RUN_ID_FILE = "wandb_run_id"
#: TensorBoard tags of the pictures.
VIEWS_TAG = "images/augmented_views"
EXAMPLES_TAG = "val_examples"


# Logged scalars that are not loss terms (kept out of the console's term list).
_NOT_TERMS = {"loss", "temperature", "logit_scale", "logit_bias", "grad_norm", "samples_per_s",
              "samples_per_s_per_gpu", "data_wait_frac", "skipped_steps", "skipped_samples", "samples_read",
              "samples_seen", "gpu_mem_gib", "itm_dropped_rows", "step_s_max", "step_s_min", "data_wait_s_max",
              "slowest_rank", "slowest"}


def _skipped_note(scalars: dict[str, float]) -> str:
    """The console's running total of lost samples: the counter TensorBoard, the summary and
    data.max_skip_fraction read (every rank's, as of the batches handed out)."""
    skipped = int(scalars.get("skipped_samples", 0))
    return f"; {skipped} corrupt samples skipped of {int(scalars.get('samples_read', 0))} read" if skipped else ""


def _drop_lines_from(path: str, step: int) -> None:
    """Like TensorBoard's ``purge_step``: a resumed run rewrites the steps a killed run logged past its last
    checkpoint, so those lines go (atomically: a temp file, then a rename)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) < step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def denormalised(images: torch.Tensor, normalisation: Optional[tuple] = None) -> torch.Tensor:
    """B x C x H x W model inputs back to uint8 pixels; ``normalisation``: the (mean, std) the loader used
    (``transforms.normalisation(cfg.data)``), CLIP's constants for C channels when None."""
    chans = images.shape[1]
    mean, std = normalisation or (MEAN[chans], STD[chans])
    mean = torch.tensor(mean).view(1, chans, 1, 1)
    std = torch.tensor(std).view(1, chans, 1, 1)
    pixels = images.detach().float().cpu() * std + mean
    return (pixels * 255.0).round().clamp(0, 255).to(torch.uint8)


def view_grid(batch: dict, max_rows: int = 8, padding: int = 2, normalisation: Optional[tuple] = None) -> torch.Tensor:
    """3 x H x W uint8 grid: one row per sample, its augmented views side by side (``image``, then
    ``image_view2`` when the batch has one), de-normalised to the pixels the augmentation produced."""
    from torchvision.utils import make_grid

    views = [batch[k][:max_rows] for k in ("image", "image_view2") if k in batch]
    pixels = [denormalised(v, normalisation) for v in views]
    tiles = torch.stack(pixels, dim=1).flatten(0, 1)  # row-major: sample 0 views, sample 1 views, ...
    return make_grid(tiles, nrow=len(views), padding=padding, pad_value=255)


def example_markdown(example: Any) -> str:
    """The text beside one retrieval example's picture: the true report and the top retrieved ones."""
    lines = [f"**{example.key}**: true report among the top {len(example.top)}: "
             f"**{'yes' if example.hit else 'no'}**", "", f"true report: {example.report}", "",
             "| rank | cosine | correct | retrieved report |", "|---|---|---|---|"]
    for rank, (text, score, correct) in enumerate(example.top, start=1):
        lines.append(f"| {rank} | {score:.3f} | {'yes' if correct else 'no'} | {text.replace('|', '/')} |")
    return "\n".join(lines)


class MissingPackageError(RuntimeError):
    """An optional feature is configured but its package is not installed."""


def import_wandb(settings: dict) -> Any:
    """The ``wandb`` module when ``monitor.wandb`` is set (None otherwise); a clear error when it is missing."""
    if not settings:
        return None
    try:
        import wandb
    except ImportError:
        raise MissingPackageError("monitor.wandb is set but the 'wandb' package is not installed: "
                           "pip install wandb (or remove monitor.wandb from the config)") from None
    return wandb


class WandbMirror:
    """Mirrors what the Monitor logs into one Weights & Biases run per run dir.

    The run id is created once and kept in ``run_dir/wandb_run_id``, so a requeued or resumed job continues
    the same W&B run (``resume="allow"``). Scalars are plotted against the training step (``step``), not
    W&B's own counter, so steps a killed job logged past its checkpoint and that the resumed job logs again
    do not make W&B drop the new values.
    """

    def __init__(self, wandb: Any, run_dir: str, settings: dict, run_config: Optional[dict]):
        self._wandb = wandb
        id_path = os.path.join(run_dir, WANDB_RUN_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)
            with open(id_path + ".tmp", "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
            os.replace(id_path + ".tmp", id_path)
        self.run = wandb.init(id=run_id, resume="allow", dir=run_dir, config=run_config, **settings)
        self.run.define_metric("step")
        for prefix in ("train", "val", "images", "health", EXAMPLES_TAG):
            self.run.define_metric(f"{prefix}/*", step_metric="step")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def image(self, pixels: torch.Tensor, caption: str = "") -> Any:
        """A ``wandb.Image`` of a C x H x W uint8 tensor."""
        return self._wandb.Image(pixels.permute(1, 2, 0).numpy(), caption=caption or None)

    def close(self) -> None:
        self.run.finish()


class Monitor:
    """Writes nothing on ranks other than 0, so every rank can call it unconditionally.

    ``wandb_settings`` (``cfg.monitor.wandb``: project, entity, ...) adds the W&B mirror, with ``run_config``
    as the W&B run's config; every rank checks that the package is there, so all of them fail together.
    """

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, purge_step: Optional[int] = None,
                 wandb_settings: Optional[dict] = None, run_config: Optional[dict] = None,
                 normalisation: Optional[tuple] = None):
        self.enabled = enabled
        self.normalisation = normalisation  # the loader's (mean, std), to show pictures as they were
        self.total_steps = total_steps
        self.start = time.time()
        self._writer = None
        self._jsonl = None
        self._wandb = None
        wandb = import_wandb(wandb_settings or {})
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
            path = os.path.join(run_dir, "metrics.jsonl")
            if purge_step is not None:
                _drop_lines_from(path, purge_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            if wandb is not None:
                self._wandb = WandbMirror(wandb, run_dir, dict(wandb_settings), run_config)

    def log_train(self, step: int, scalars: dict[str, float], start_step: int = 0) -> None:
        """``scalars``: flat names such as ``loss``, ``itc``, ``lr/image``, ``samples_per_s``; a str value (the
        slowest rank's name) goes to metrics.jsonl and the console only."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            if not isinstance(v, str):
                self._writer.add_scalar(f"train/{k}", v, step)
        self._writer.flush()
        self._write_jsonl({"split": "train", "step": step, **scalars})
        if self._wandb is not None:
            self._wandb.log(step, {f"train/{k}": v for k, v in scalars.items() if not isinstance(v, str)})
        done = step - start_step
        eta = (time.time() - self.start) / max(1, done) * (self.total_steps - step)
        terms = " ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k not in _NOT_TERMS and "/" not in k)
        print(f"step {step}/{self.total_steps} loss {scalars['loss']:.4f} ({terms}) "
              f"T {scalars.get('temperature', float('nan')):.4f} lr {scalars.get('lr/head', 0.0):.2e} "
              f"gnorm {scalars.get('grad_norm', float('nan')):.3f} "
              f"{scalars.get('samples_per_s', 0.0):.1f} samples/s data-wait {100 * scalars.get('data_wait_frac', 0):.0f}% "
              + (f"slowest {scalars['slowest']} " if "slowest" in scalars else "")
              + f"eta {eta / 60:.1f} min" + _skipped_note(scalars), flush=True)

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._writer.add_scalar(f"val/{k}", v, step)
        self._writer.flush()
        self._write_jsonl({"split": "val", "step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log(step, {f"val/{k}": v for k, v in metrics.items()})
        print(f"val step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    def log_summary(self, step: int, summary: dict) -> None:
        """The last line of a launch in metrics.jsonl (``"split": "summary"``) and on the console."""
        if not self.enabled:
            return
        self._write_jsonl({"split": "summary", "step": step, **summary})
        worst = ", ".join(f"{os.path.basename(s)} ({n})" for s, n in list(summary["skipped_by_shard"].items())[:3])
        print(f"summary: {summary['status']} at step {step}; {summary['skipped_steps']} non-finite steps skipped; "
              f"{summary['skipped_samples']} corrupt samples skipped of {summary['samples_read']} read"
              + (f" (worst shards: {worst})" if worst else "")
              + (f"; {summary['rollbacks']} loss-spike rollbacks skipped {summary['rollback_skipped_samples']} samples"
                 if summary.get("rollbacks") else ""), flush=True)

    def log_rollback(self, record: dict, abandoned: dict[int, float]) -> None:
        """A loss-spike rollback (``engine.health.rollback``): its event line in metrics.jsonl; in TensorBoard the
        abandoned steps are purged (as a resume purges a killed run's, so the retrained steps replace them),
        their losses kept under ``health/abandoned_loss`` and the rollback marked (``health/rollbacks`` and a
        text note at the step it returned to)."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._write_jsonl({"split": "event", **record})
        to_step = record["to_step"]
        self._writer._get_file_writer().add_event(
            Event(step=to_step + 1, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
        for step, loss in sorted(abandoned.items()):
            self._writer.add_scalar("health/abandoned_loss", loss, step)
        self._writer.add_scalar("health/rollbacks", record["rollbacks"], to_step)
        self._writer.add_text("health/rollback", f"rolled back from step {record['from_step']} to {to_step}: losses "
                              f"of steps {record['first_spike_step']}.. above {record['limit']:.4g} "
                              f"({record['skipped_samples']} samples skipped)", to_step)
        self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(to_step, {"health/rollbacks": record["rollbacks"]})

    def log_views(self, step: int, batch: dict, max_rows: int = 8) -> None:
        """TensorBoard image ``images/augmented_views``: the first ``max_rows`` samples of a training batch,
        each row its augmented views side by side, de-normalised (see ``view_grid``)."""
        if not self.enabled:
            return
        grid = view_grid(batch, max_rows, normalisation=self.normalisation)
        self._writer.add_image(VIEWS_TAG, grid, step)
        self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(step, {VIEWS_TAG: self._wandb.image(grid)})

    def log_retrieval_examples(self, step: int, examples: Sequence[Any]) -> None:
        """Per example (``eval.RetrievalExample``) i: image ``val_examples/[set/]i`` (the de-normalised input)
        and text ``val_examples/[set/]i`` (true report, top retrieved reports, whether the true one is there)."""
        if not self.enabled or not examples:
            return
        for i, example in enumerate(examples):
            tag = f"{EXAMPLES_TAG}/{example.set_name + '/' if example.set_name else ''}{i}"
            pixels = denormalised(example.image[None], self.normalisation)[0]
            text = example_markdown(example)
            self._writer.add_image(tag, pixels, step)
            self._writer.add_text(tag, text, step)
            if self._wandb is not None:
                self._wandb.log(step, {tag: self._wandb.image(pixels, caption=text)})
        self._writer.flush()

    def event(self, message: str, record: Optional[dict] = None) -> None:
        """A one-off message (skipped step, resume, checkpoint) on the console of rank 0; with a ``record`` (its
        numbers as fields, ``step`` among them) also a ``"split": "event"`` line in metrics.jsonl."""
        if self.enabled:
            print(message, file=sys.stdout, flush=True)
            if record is not None:
                self._write_jsonl({"split": "event", **record, "message": message})

    def _write_jsonl(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = self._jsonl = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def gpu_memory_gib() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30
