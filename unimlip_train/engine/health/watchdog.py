"""The hang watchdog: a rank that makes no progress for ``train.hang_timeout_s`` writes where every thread of it
is, and the job ends on every rank with exit status 4 instead of waiting for the collective timeout.

Progress is a completed optimizer step, a written checkpoint or a finished evaluation (the trainer calls
``beat``), so the limit applies to the longest of these, never to their sum. The watchdog is armed when the
training loop starts, after the process group, the engine and a resumed checkpoint are up (DeepSpeed's op
builds and checkpoint loading come before it); until the launch's first optimizer step has completed it allows
``FIRST_STEP_FACTOR`` times the limit, since that step also forks the loader workers, fills the shuffle buffer
and compiles (torch.compile, cuDNN autotuning).

When it fires, on each rank that stalls (with collectives every step, every rank stalls within a step of the
stuck one):

1. ``RUN_DIR/hang/rank{R}.txt``: host, PID, step, how long since the last progress, the last collective this rank
   entered (``crumb``, a breadcrumb the trainer sets before its collectives), the PIDs of its loader workers, and
   every thread's Python stack (``sys._current_frames``); each loader worker prints its own stacks to stderr;
2. rank 0 waits up to ``GRACE_S`` for every rank's dump, then appends the one ``{"split": "summary", "status":
   "hung", ...}`` line to metrics.jsonl and runs ``on_hang`` (the SLURM job requeues itself there). Exactly once:
   the writer first creates a claim file with ``O_EXCL``; if rank 0 itself is wedged past Python's reach, a
   rank that waited twice the grace for it writes the line instead;
3. every rank exits with ``os._exit(HUNG)``: no atexit handlers, no DeepSpeed teardown, no collective (each could
   wait on the stuck peer).

The ranks coordinate through files in ``RUN_DIR/hang/.LAUNCH`` (the run dir is shared by all nodes anyway),
never through the process group, which is what hangs. ``LAUNCH`` is a token the ranks agree on at start, so
files of an earlier launch never count.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Callable, Optional

import unimlip_train.distributed.process_group as du
from unimlip_train.data.worker_signals import STACK_SIGNAL

#: The exit status of every rank of a hung job.
HUNG = 4
HANG_DIR = "hang"
FIRST_STEP_FACTOR = 3.0
GRACE_S = 30.0


def collective_timeout_s(hang_timeout_s: float) -> Optional[float]:
    """The process-group timeout that lets the watchdog act first (a failed collective would end the job with an
    exception on some ranks and no record of where the others were): longer than the first step's allowance by
    5 minutes, never shorter than DeepSpeed's default (``DEEPSPEED_TIMEOUT`` minutes, 10 unless set). None (the
    default) with the watchdog off."""
    if hang_timeout_s <= 0:
        return None
    return max(60.0 * int(os.environ.get("DEEPSPEED_TIMEOUT", "10")), FIRST_STEP_FACTOR * hang_timeout_s + 300.0)


class HangWatchdog:
    """One per rank. ``start`` (collective) arms it; ``beat`` after progress; ``crumb`` before collectives; ``stop``.

    ``on_hang()``, run by the rank that writes the summary line, may return a note for it (what it did).
    ``on_fire()`` runs first on every rank that fires (e.g. muting the stop signals' messages: torchrun and SLURM
    signal the ranks still writing their dumps once the first one exits)."""

    def __init__(self, run_dir: str, rank: int, world: int, timeout_s: float,
                 on_hang: Optional[Callable[[], Optional[str]]] = None, on_fire: Optional[Callable[[], None]] = None,
                 grace_s: float = GRACE_S):
        self.run_dir, self.rank, self.world, self.timeout_s = run_dir, rank, world, timeout_s
        self.grace_s = grace_s
        self.on_hang, self.on_fire = on_hang, on_fire
        self.dir = os.path.join(run_dir, HANG_DIR)
        self.step = 0
        self.stepped = False  # the launch's first optimizer step has completed
        self.last_progress = time.monotonic()
        self.last_crumb: tuple[str, int, float] = ("none yet", 0, time.time())
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._launch = ""

    # ------------------------------------------------------------------------------------- the trainer's side
    def start(self, step: int) -> None:
        """Collective (agrees on the launch token): arm the watchdog at ``step``, the loop's first."""
        self._launch = du.all_gather_object(uuid.uuid4().hex[:12])[0]
        if self.rank == 0 and os.path.isdir(self.dir):  # made when the watchdog first fires
            for name in os.listdir(self.dir):  # coordination files of earlier launches; their dumps stay
                if name.startswith("."):
                    shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        du.barrier()
        self.step, self.last_progress = step, time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, stepped: bool = True) -> None:
        """Progress: an optimizer step completed (``stepped``), or a checkpoint or evaluation finished."""
        self._hold_if_fired()
        self.step, self.last_progress = step, time.monotonic()
        self.stepped = self.stepped or stepped

    def crumb(self, what: str) -> None:
        """Before a collective: what it is (kept for the dump; a tuple assignment, nothing else)."""
        self._hold_if_fired()
        self.last_crumb = (what, self.step, time.time())

    def stop(self) -> None:
        """End the watch; once it has fired, wait for it to end the process instead (status ``HUNG``)."""
        self._hold_if_fired()
        self._stop.set()

    def _hold_if_fired(self) -> None:
        if self.fired.is_set():  # the main thread came back after the watchdog fired: it ends the process
            while True:
                time.sleep(60)

    # ------------------------------------------------------------------------------------------ the watch
    def _limit(self) -> float:
        return self.timeout_s * (1.0 if self.stepped else FIRST_STEP_FACTOR)

    def _watch(self) -> None:
        poll = min(5.0, max(0.1, self.timeout_s / 20))
        while not self._stop.wait(poll):
            stalled = time.monotonic() - self.last_progress
            if stalled > self._limit():
                self.fired.set()
                self._end(stalled)

    def _coord(self, name: str) -> str:
        return os.path.join(self.dir, f".{self._launch}", name)

    def _end(self, stalled: float) -> None:
        if self.on_fire is not None:
            self.on_fire()
        os.makedirs(os.path.dirname(self._coord("x")), exist_ok=True)
        dump = os.path.join(self.dir, f"rank{self.rank}.txt")
        what, crumb_step, since = self.last_crumb
        mine = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                "stalled_s": round(stalled, 1),
                "last_collective": f"{what} (step {crumb_step + 1}, entered {time.time() - since:.0f} s ago)"}
        _write_atomic(dump, self._dump_text(mine, _ask_workers_for_stacks()))
        _write_atomic(self._coord(f"rank{self.rank}.json"), json.dumps(mine))
        print(f"unimlip-train rank {self.rank}: no progress for {stalled:.0f} s (train.hang_timeout_s="
              f"{self.timeout_s:g}) after step {self.step}; last collective: {mine['last_collective']}; "
              f"every thread's stack is in {dump}; ending the job (status {HUNG})", file=sys.stderr, flush=True)
        if self.rank == 0:
            self._wait_for(lambda: len(self._dumped()) == self.world, self.grace_s)
            self._summarise()
        elif not self._wait_for(lambda: os.path.exists(self._coord("done")), 2 * self.grace_s):
            self._summarise()  # rank 0 did not: it is wedged beyond Python's reach
            self._wait_for(lambda: os.path.exists(self._coord("done")), self.grace_s)
        os._exit(HUNG)

    def _dumped(self) -> dict[int, dict]:
        out = {}
        for rank in range(self.world):
            try:
                with open(self._coord(f"rank{rank}.json"), encoding="utf-8") as f:
                    out[rank] = json.load(f)
            except (OSError, ValueError):
                continue
        return out

    def _summarise(self) -> None:
        """The hung summary line, by whichever rank claims it first (O_EXCL), then ``on_hang``."""
        try:
            os.close(os.open(self._coord("claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        dumped = self._dumped()
        note = None
        if self.on_hang is not None:
            try:
                note = self.on_hang()
            except Exception as e:  # noqa: BLE001 (the process ends next; the line must still be written)
                note = f"on_hang failed: {type(e).__name__}: {e}"
        record = {"split": "summary", "status": "hung", "step": max((d["step"] for d in dumped.values()),
                                                                    default=self.step),
                  "hang_timeout_s": self.timeout_s, "ranks_dumped": sorted(dumped), "world_size": self.world,
                  "dumps": os.path.join(self.dir, "rank{R}.txt"),
                  "last_collective": {str(r): d["last_collective"] for r, d in sorted(dumped.items())},
                  "stalled_s": {str(r): d["stalled_s"] for r, d in sorted(dumped.items())}}
        if note:
            record["action"] = note
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        missing = sorted(set(range(self.world)) - set(dumped))
        print(f"summary: hung after step {record['step']}; stack dumps of ranks {sorted(dumped)} in {self.dir}"
              + (f"; ranks {missing} wrote none (wedged beyond Python, or already gone)" if missing else "")
              + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
        _write_atomic(self._coord("done"), "")

    @staticmethod
    def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _dump_text(self, mine: dict, workers: list[int]) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [f"hang watchdog, {datetime.datetime.now().isoformat(timespec='seconds')}: rank {self.rank} of "
                 f"{self.world} on host {mine['host']}, PID {mine['pid']}",
                 f"no progress for {mine['stalled_s']} s (train.hang_timeout_s={self.timeout_s:g}); last completed "
                 f"step {self.step}",
                 f"last collective entered: {mine['last_collective']}",
                 f"loader worker PIDs: {workers or 'none'} (each was just asked to print its "
                 "threads' stacks to the job's stderr)", ""]
        for ident, frame in sys._current_frames().items():
            lines.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:")
            lines.append("".join(traceback.format_stack(frame)))
        return "\n".join(lines)


def _ask_workers_for_stacks() -> list[int]:
    """Send this rank's loader workers ``worker_signals.STACK_SIGNAL`` (each prints its threads' stacks to the
    job's stderr); their PIDs."""
    workers = [p.pid for p in multiprocessing.active_children()]
    for pid in workers:
        try:
            os.kill(pid, STACK_SIGNAL)
        except OSError:  # exited meanwhile
            pass
    return workers


def _write_atomic(path: str, text: str) -> None:
    """As ``checkpoint.save.atomic_write`` but without its fsync, which could block on the hung file system."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
