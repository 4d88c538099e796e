"""Test environment: offline, CPU DeepSpeed, one thread per process."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_ENV = {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations' version check on import (the project sets it too)
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# The venv's bin first: console scripts and torchrun resolve to this interpreter, and DeepSpeed's JIT op
# always sees the same ninja (a different ninja forces a ~30 s rebuild).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parent.parent
# Real test data kept in the repository (licences and sources: tests/data/README.md).
TEST_DATA = REPO / "tests" / "data"
IU_REPORTS_TGZ = TEST_DATA / "iu_xray_reports" / "NLMCXR_reports.tgz"  # IU X-ray reports, CC BY-NC-ND 4.0
PNEUMONIAMNIST_NPZ = TEST_DATA / "pneumoniamnist" / "pneumoniamnist_subset.npz"  # CC BY 4.0


def extract_members(tar, dest, members) -> None:
    """``tar.extractall`` with the "data" filter where this Python has it (3.10.12+, 3.11.4+; Debian 12 ships
    3.11.2): the members are regular files of the repository's own test archive either way."""
    import tarfile

    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(dest, members=members, **extra)


def embed_eval_set(model, cfg, tokenizer, source, split: str = "val", batch_size: int = 16) -> tuple:
    """(image embeddings, text embeddings, reports) of every sample of ``source``/``split``, one process."""
    import torch

    from unimlip_train.data.eval_loader import build_eval_loader

    images, texts, reports = [], [], []
    with torch.no_grad():
        for batch in build_eval_loader(cfg, source, tokenizer, batch_size, 0, 1, split=split):
            images.append(model.encode_image(batch["image"]))
            texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"]))
            reports += batch["text"]
    return torch.cat(images), torch.cat(texts), reports


def naive_recall_at_1(image, text, reports: list) -> tuple:
    """Image->text and text->image R@1 in percent, by plain loops: a query counts when no wrong candidate scores
    at least as high as its best correct one; reports equal after collapsing whitespace and case-folding are
    correct for each other (the evaluation's duplicate rule)."""
    norm = [" ".join(r.split()).casefold() for r in reports]
    sims = (image.double() @ text.double().T).tolist()
    n = len(reports)

    def hits(score) -> float:
        good = 0
        for q in range(n):
            best = max(score(q, c) for c in range(n) if norm[q] == norm[c])
            good += not any(score(q, c) >= best for c in range(n) if norm[q] != norm[c])
        return 100.0 * good / n

    return hits(lambda q, c: sims[q][c]), hits(lambda q, c: sims[c][q])


def tiny_overrides(index: str, tokenizer: str, steps: int, micro_batch: int, **extra) -> list:
    """``key=value`` overrides of configs/tiny_cpu.yaml for the multi-process tests: a ViT and a BERT a few
    thousand parameters big at 32 px over ``index`` with the tokenizer in ``tokenizer``, every Uni-Mlip term on
    (ITM too, which the tiny config leaves off), a metrics line every step, a checkpoint every 4 (the last 2
    kept); ``extra`` (dotted keys) overrides any of it."""
    base = {
        "data.train": index, "data.val": index, "model.tokenizer": tokenizer,
        "data.image_size": 32, "data.num_workers": 1, "data.shuffle_buffer": 32, "data.text.max_length": 32,
        "model.image.name": "vit_tiny_patch16_224",
        "model.image.kwargs": "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2.0}",
        "model.text.config": "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                             "intermediate_size: 64, max_position_embeddings: 64}",
        "model.embed_dim": 32, "model.ssl_embed_dim": 32, "model.fusion": "{layers: 1, heads: 2}",
        "train.micro_batch_size": micro_batch, "train.steps": steps, "train.warmup_steps": 2, "train.log_every": 1,
        "train.checkpoint_every": 4, "train.keep_checkpoints": 2, "train.lr": 2e-3, "loss.itm.weight": 0.125,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_shards(root) -> tuple:
    """170 synthetic 32-px samples in shards of 30 (10 % val) and a tokenizer built on them, under ``root``:
    (index.json path, tokenizer dir), for ``tiny_overrides``."""
    shards, tok = root / "shards", root / "tok"
    common = dict(check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "170", "--image-size", "32",
                    "--max-size", "32", "--val-fraction", "0.1", "--shard-size", "30", "--out", str(shards),
                    "--workers", "1", "--no-progress"], **common)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "tokenizer", "--data", str(shards), "--out", str(tok)],
                   **common)
    return str(shards / "index.json"), str(tok)


def still_running(procs: list, timeout: float = 30.0) -> list:
    """Those of ``procs`` (psutil processes) still running after up to ``timeout`` seconds of waiting for them to
    end; a zombie counts as ended (this sandbox's init reaps orphans late)."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while any(running(p) for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    return [p for p in procs if running(p)]


# ``pytest -n 2`` (the README's command, pytest-xdist): each file's tests run together in one worker (a module
# fixture such as a reference training runs once), and all SLURM tests together in one worker (they share the
# local cluster, which some of them restart or take nodes from), in the files' order: the SLURM group starts with
# the first file, and the other worker works through the rest beside it. (xdist's own ``--dist loadgroup`` does
# not group under pytest 9, whose nodes keep their id elsewhere, so the grouping is this scheduler's.)
def worker_group(nodeid: str) -> str:
    """A test's group under ``pytest -n``: ``slurm`` for tests/test_slurm*.py and tests named ``*_on_slurm``."""
    path, _, name = nodeid.partition("::")
    return "slurm" if Path(path).name.startswith("test_slurm") or name.split("[")[0].endswith("_on_slurm") else path


def pytest_collection_modifyitems(config, items):
    misplaced = [i.nodeid for i in items if i.get_closest_marker("slurm") and worker_group(i.nodeid) != "slurm"]
    if misplaced:
        raise pytest.UsageError(f"SLURM tests must live in tests/test_slurm*.py or end in _on_slurm: {misplaced}")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs the tests one after another
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist keeps its meaning
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False
    return ByWorkerGroup(config, log)
