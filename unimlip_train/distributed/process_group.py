"""Process-group setup from whatever launched us: torchrun, the ``deepspeed`` launcher, SLURM, or nothing.

torchrun and ``deepspeed`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under a plain
``srun`` only SLURM_* variables exist, so they are translated here; a bare ``python`` run becomes a
one-process group on a free local port, so the same code path (DeepSpeed needs a process group) serves all.
"""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
import re
import socket
import threading
from typing import Optional

import torch
import torch.distributed as dist

from unimlip_train.distributed.quiet import OP_BUILT, drop_deprecation_noise, share_op_build, without_lines


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-005,010],cpu1`` (no ``scontrol`` needed)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return "127.0.0.1"
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_env() -> None:
    """Fill the torch.distributed env:// variables from SLURM, or for a single local process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        # With one GPU per task (srun --gpus-per-task=1) each task sees only "its" GPU, as cuda:0.
        one_visible_gpu = torch.cuda.is_available() and torch.cuda.device_count() == 1
        env["LOCAL_RANK"] = "0" if one_visible_gpu else env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if "MASTER_PORT" not in env:
            # Every task of a job must agree on the port without talking: derive it from the job id.
            env["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    else:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port())


def quiet_cpu_run() -> None:
    """Without a GPU, tell DeepSpeed it runs on the CPU (instead of its "unable to detect" warning at import)
    and silence torch's "No CUDA runtime is found" note from its extension builder. Effective only before
    ``deepspeed`` is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _announce_op_build(local_rank: int) -> threading.Event:
    """On the CPU accelerator DeepSpeed JIT-compiles a C++ op when the process group starts: 60-90 s of
    silence the first time (or after the venv or the ninja on PATH changed), cached afterwards. Whether it
    will rebuild cannot be told beforehand, so a watcher says so (once per node) while torch's build lock is
    held (torch holds it with flock while it compiles). Set the returned event when the process group is up."""
    done = threading.Event()
    from deepspeed.accelerator import get_accelerator

    if local_rank != 0 or get_accelerator().device_name() != "cpu":
        return done
    import deepspeed.ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return done
    folder = _get_build_directory(builder.NAME, verbose=False)

    def compiling() -> bool:
        try:
            with open(os.path.join(folder, "lock"), "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
        except BlockingIOError:
            return True
        except OSError:  # no folder yet, or no flock on this file system
            pass
        return False

    def watch() -> None:
        while not done.wait(1.0):
            if compiling():
                print(f"DeepSpeed is compiling its CPU communication op ({builder.NAME}) in {folder}: about 60-90 s, "
                      "once for this venv (every command reuses it)", flush=True)
                return

    threading.Thread(target=watch, name="op-build-note", daemon=True).start()
    return done


def init_distributed(backend: str = "", timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Start (once) the process group; returns ``(rank, world_size, local_rank)``.

    ``backend`` '' picks nccl when CUDA is available and gloo otherwise. ``timeout_s``: how long a collective
    may wait before it fails, on this group and the control group (None: DeepSpeed's default, 10 minutes or
    ``DEEPSPEED_TIMEOUT``); the hang watchdog asks for longer, so that it acts first.
    """
    global _TIMEOUT
    _export_env()
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        quiet_cpu_run()
        share_op_build()
        drop_deprecation_noise()
        import deepspeed

        building = _announce_op_build(local_rank)
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        _TIMEOUT = timeout.get("timeout")
        try:
            with without_lines(OP_BUILT):  # one line per rank that says nothing new
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                           rank=rank, world_size=world, **timeout)
        finally:
            building.set()
    return dist.get_rank(), dist.get_world_size(), local_rank


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process without a process group."""
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def env_rank() -> int:
    """This process's global rank from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def all_gather_object(obj):
    """Every rank's ``obj`` (small, picklable: our own counters, never shard content), in rank order, through
    the CPU control group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def all_reduce_max(value: float) -> float:
    """Max of a host scalar over all ranks, through the CPU control group (no GPU synchronisation): every
    rank gets the same answer (stop agreement, padding lengths)."""
    return all_reduce_max_many([value])[0]


_CONTROL_GROUP = None
_TIMEOUT: Optional[datetime.timedelta] = None  # the process group's, when init_distributed was given one


def control_group():
    """A gloo group over the same ranks for small host-side agreements (stop flags, padding lengths): on a
    CUDA run these then never wait for the GPU's queue. The default group when that is already gloo.
    Created on first use, which every rank reaches at the same point of the loop."""
    global _CONTROL_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _CONTROL_GROUP


def all_reduce_max_many(values: list[float]) -> list[float]:
    """``all_reduce_max`` of several host scalars in one collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return t.tolist()
