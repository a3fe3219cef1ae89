"""Preemption and time limits: a signal only sets a flag; the trainer acts on it at a step boundary.

SLURM sends USR2 (`--signal=USR2@<delay>`, submitit's choice) before a time limit, and on preemption when
the controller has `preempt_send_user_signal`. submitit's own handler would checkpoint in the middle of a
step on rank 0 alone; ours replaces it: all ranks agree at the next step boundary, save one checkpoint,
then rank 0 requeues the job (task.py) within the requeue budget (a time limit alone does not requeue).
A hung rank's stacks: SIGQUIT makes faulthandler write them (answer_stack_requests). No torch.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path
from types import FrameType
from typing import TextIO

from asrlaunch.core.rundir import RunDir

# USR2: SLURM's warning before a time limit, and at preemption with `preempt_send_user_signal`. TERM: most
# sites' preemption (a grace time, then KILL), and a user's `scancel --signal=TERM`.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """Set from a signal handler, read by the training loop."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handler)


class JobInterrupted(RuntimeError):
    """Training stopped at a checkpoint because the job was signalled; it resumes from there."""

    def __init__(self, step: int, reason: str, requeued: bool, saved: bool = True) -> None:
        self.step, self.reason, self.requeued = step, reason, requeued
        action = (
            "requeued" if requeued else "not requeued (continue it with `asrlaunch submit --resume RUN_DIR`)"
        )
        checkpoint = "checkpoint saved" if saved else "its checkpoint could not be written"
        super().__init__(f"stopped at step {step} ({reason}); {checkpoint}; job {action}")


_STACK_FILE: dict[Path, TextIO] = {}  # open for the process's life: faulthandler writes into it from a signal


def answer_stack_requests(run_dir: RunDir, rank: int) -> None:
    """SIGQUIT writes the Python stack of every thread into stacks/rank<R>-pid<P>.txt (the supervisor asks
    when a rank hangs). Registered first thing in a task, before torch's imports: the supervisor signals a
    whole step, and SIGQUIT's default would end (and core-dump) a rank still importing, the very rank whose
    stacks say where a cold file system hangs. faulthandler writes from the signal handler itself, so a rank
    stuck in C answers too. Once per run and rank in a process."""
    path = run_dir.rank_stacks(rank, os.getpid())
    if path in _STACK_FILE:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_SYNC: on NFS a write reaches the server at once, not at close (the supervisor reads elsewhere)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_SYNC, 0o644)
        _STACK_FILE[path] = os.fdopen(descriptor, "w")
    except OSError:
        return
    faulthandler.register(signal.SIGQUIT, file=_STACK_FILE[path], all_threads=True)
