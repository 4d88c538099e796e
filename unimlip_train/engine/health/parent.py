"""Ranks follow their launcher: a rank whose launcher dies (``kill -9``, an OOM kill, a crashed agent) exits
within seconds instead of training on, holding the run lock and refusing the user's rerun.

torchrun starts each rank in a session of its own and signals the ranks only when it shuts down in good order,
so a launcher killed outright signals nothing. Here a daemon thread compares ``os.getppid()`` with the parent
recorded at start once a second: the kernel reparents a process the moment its parent exits, whether or not
the dead parent is reaped. Under DeepSpeed's per-node launcher (which outlives the ``deepspeed`` command that
started it) the thread also watches that command. On a death it prints one line and leaves with
``os._exit(LAUNCHER_GONE)``: no checkpoint (the other ranks may be gone, so a collective could wait forever),
no atexit handlers or DeepSpeed teardown (either may block on a dead peer). A checkpoint being written stays
incomplete, which the save protocol makes invisible (``latest`` still names the last complete one); the run
lock is left to its next owner, who takes it over because its holder's process is gone.

Why a watch and not ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the parent *thread* that started us
exits, not the parent process, so a launcher spawning from a helper thread would kill healthy ranks; it
cannot watch the ``deepspeed`` command above DeepSpeed's launcher; and it arrives as a plain signal that reads
like the scheduler's SIGTERM (which checkpoints, collectively, with ranks that may be gone). It is used where
it is safe: DataLoader workers are forked by their rank's main thread, which lives as long as the rank
(``unimlip_train.data.worker_signals``).

Only ranks whose parent is a launcher watch (torchrun, DeepSpeed's launcher, a SLURM step, Submitit's local
controller): a bare ``unimlip-train`` under ``nohup`` keeps running when its shell exits.
``UNIMLIP_FOLLOW_LAUNCHER=1`` makes any parent count as the launcher, ``=0`` turns the watch off.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

#: The exit status of a rank whose launcher is gone (128 + SIGHUP: the conventional status of a process whose
#: controlling parent went away).
LAUNCHER_GONE = 129
FOLLOW_ENV = "UNIMLIP_FOLLOW_LAUNCHER"
POLL_S = 1.0


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state letter, parent PID, start time in clock ticks) of ``pid``, None when there is no such process."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


@dataclass
class Launcher:
    """A process this rank follows: ``pid`` and its start time (a reused PID is not it), and what it is."""

    pid: int
    start: Optional[int]
    what: str

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[0] not in "ZX" and stat[2] == self.start


def find_launchers(env: Optional[dict] = None) -> list[Launcher]:
    """The launcher processes of this rank, nearest first ([] when the parent is not a launcher)."""
    env = os.environ if env is None else env
    follow = env.get(FOLLOW_ENV, "")
    if follow == "0":
        return []
    ppid = os.getppid()
    stat = _stat(ppid)
    parent_cmd, parent_comm = _cmdline(ppid), _read(f"/proc/{ppid}/comm").strip()
    if "TORCHELASTIC_RUN_ID" in env:
        what = "torchrun"
    elif "deepspeed.launcher.launch" in parent_cmd:
        what = "DeepSpeed's launcher"
    elif parent_comm == "slurmstepd":
        what = "the SLURM step (slurmstepd)"
    elif "submitit" in parent_cmd:
        what = "Submitit's controller"
    elif follow == "1":
        what = "the launcher"
    else:
        return []
    found = [Launcher(ppid, stat[2] if stat else None, what)]
    if what == "DeepSpeed's launcher" and stat:  # started by the `deepspeed` command, which it outlives
        grand = stat[1]
        grand_stat = _stat(grand)
        if grand > 1 and grand_stat and "deepspeed" in _cmdline(grand):
            found.append(Launcher(grand, grand_stat[2], "the deepspeed command"))
    return found


class LauncherWatch:
    """Exits this process (``LAUNCHER_GONE``) once one of its launchers is gone; ``start`` returns at once."""

    def __init__(self, launchers: list[Launcher], rank: int):
        self.launchers, self.rank = launchers, rank
        self._parent = os.getppid()

    @classmethod
    def start_if_launched(cls, rank: int) -> Optional["LauncherWatch"]:
        launchers = find_launchers()
        if not launchers:
            return None
        watch = cls(launchers, rank)
        threading.Thread(target=watch._run, name="launcher-watch", daemon=True).start()
        return watch

    def gone(self) -> Optional[Launcher]:
        """The first launcher that is gone, None while all run."""
        if os.getppid() != self._parent:
            return self.launchers[0]
        return next((launcher for launcher in self.launchers[1:] if not launcher.alive()), None)

    def _run(self) -> None:
        while (launcher := self.gone()) is None:
            time.sleep(POLL_S)
        self._leave(launcher)

    def _leave(self, launcher: Launcher) -> None:
        print(f"unimlip-train rank {self.rank}: its launcher ({launcher.what}, PID {launcher.pid}) is gone; exiting "
              f"now (status {LAUNCHER_GONE}) without a checkpoint: rerun to resume from the latest complete one",
              file=sys.stderr, flush=True)
        os._exit(LAUNCHER_GONE)

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Around the training: an exception while the launcher is gone is that death seen first through a
        peer (one that followed its launcher a moment earlier breaks this rank's collective), so this rank
        leaves the same way, before any cleanup (the run lock stays for its next owner to take over)."""
        try:
            yield
        except BaseException:
            if (launcher := self.gone()) is not None:
                self._leave(launcher)
            raise


def following(watch: Optional[LauncherWatch]) -> contextlib.AbstractContextManager:
    """``watch.following()``, or nothing when this rank has no launcher to follow."""
    return watch.following() if watch is not None else contextlib.nullcontext()
