"""A rank's heartbeat: what it is doing and whether it still makes progress, for the supervisor outside the
ranks (supervisor.py). No torch.

The training loop only sets attributes (its phase, its step, a progress tick, whether it waits in a
collective): nothing per step touches a file. A daemon thread writes them, with the time, to
`<run_dir>/heartbeats/rank<R>.json` every `interval_s` (a private file, then a rename). The thread keeps
writing while the main thread waits in a collective or in I/O (both release the GIL), and stops with the
process: a stopped process (SIGSTOP, a debugger) or one stuck holding the GIL shows as a stale `time`; one
that lives but moves no further shows as a stale `since`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from asrlaunch.core.rundir import RunDir, write_text_atomic

PHASES = ("startup", "step", "eval", "checkpoint", "final", "done")


@dataclass(frozen=True)
class Beat:
    """One heartbeat as written (and read back by the supervisor)."""

    rank: int
    pid: int
    host: str
    node: str | None
    started: float  # when the process started
    attempt: int | None
    phase: str
    step: int
    since: float  # the last progress (a step done, an evaluation batch, a prepared utterance)
    waiting: bool  # inside a collective, waiting for the other ranks
    max_step_s: float  # the longest training step of this attempt so far, its first left out
    time: float  # when the thread wrote it: the process was alive then

    @classmethod
    def read(cls, path: Path) -> Beat | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


class Heartbeat:
    current: Heartbeat | None = None  # this process's, for the collectives deep in the code (see `waiting`)

    def __init__(self, run_dir: RunDir, rank: int, started: float, interval_s: float = 2.0) -> None:
        self.path = run_dir.heartbeat(rank)
        self.rank, self.started, self.interval_s = rank, started, interval_s
        self.attempt: int | None = None
        self.phase, self.step, self.since = "startup", 0, time.time()
        self.waiting_depth, self.max_step_s, self.steps_timed = 0, 0.0, 0
        self._stop = threading.Event()
        self._writing = threading.RLock()  # the loop and the thread both write: one temporary file at a time
        self._thread = threading.Thread(target=self._run, name="asrlaunch-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        Heartbeat.current = self
        return self

    # -- what the loop tells it: attribute writes, and the file at once where the phase or attempt changes --
    # (the thread writes every `interval_s`: a start and a few fast steps can fit between two of its beats,
    # and a rank stopped there would be judged from a beat that still says "startup", attempt unknown)
    def begin_attempt(self, attempt: int) -> None:
        self.attempt, self.steps_timed = attempt, 0
        self.write()

    def enter(self, phase: str, step: int | None = None) -> None:
        self.phase, self.since = phase, time.time()
        if step is not None:
            self.step = step
        self.write()

    def progress(self, step: int | None = None) -> None:
        self.since = time.time()
        if step is not None:
            self.step = step

    def step_done(self, step: int, seconds: float) -> None:
        self.step, self.since = step, time.time()
        if self.steps_timed:  # an attempt's first step compiles and warms up: it sets no step budget
            self.max_step_s = max(self.max_step_s, seconds)
        self.steps_timed += 1
        if self.phase != "step":
            self.phase = "step"
            self.write()

    @contextmanager
    def in_collective(self) -> Iterator[None]:
        self.waiting_depth += 1
        try:
            yield
        finally:
            self.waiting_depth -= 1

    # -- the thread ---------------------------------------------------------------------------------------
    def beat(self) -> Beat:
        return Beat(
            rank=self.rank,
            pid=os.getpid(),
            host=socket.gethostname(),
            node=os.environ.get("SLURMD_NODENAME"),
            started=self.started,
            attempt=self.attempt,
            phase=self.phase,
            step=self.step,
            since=round(self.since, 3),
            waiting=self.waiting_depth > 0,
            max_step_s=round(self.max_step_s, 3),
            time=round(time.time(), 3),
        )

    def write(self) -> None:
        with self._writing, contextlib.suppress(OSError):  # a full file system: the supervisor sees silence
            write_text_atomic(self.path, json.dumps(asdict(self.beat())))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def stop(self, phase: str = "done") -> None:
        self._stop.set()
        self.enter(phase)
        if Heartbeat.current is self:
            Heartbeat.current = None


@contextmanager
def waiting() -> Iterator[None]:
    """Marks this process as waiting for the other ranks (a barrier, a reduction, a gather) while inside, so
    that a hang is blamed on a rank that is not waiting. A no-op without a heartbeat."""
    beat = Heartbeat.current
    if beat is None:
        yield
        return
    with beat.in_collective():
        yield


def progress(step: int | None = None) -> None:
    """A progress tick from anywhere in this process (evaluation batches, corpus preparation)."""
    if Heartbeat.current is not None:
        Heartbeat.current.progress(step)


def read_beats(run_dir: RunDir) -> dict[int, Beat]:
    found = {}
    for rank, path in run_dir.heartbeats().items():
        beat = Beat.read(path)
        if beat is not None:
            found[rank] = beat
    return found
