"""Preemption and time limits: a signal only sets a flag; the trainer acts on it at a step boundary.

SLURM sends USR2 (`--signal=USR2@<delay>`, submitit's choice) before a time limit, and on preemption when
the controller has `preempt_send_user_signal`. submitit's own handler would checkpoint in the middle of a
step on rank 0 alone; ours replaces it: all ranks agree at the next step boundary, save one checkpoint,
then rank 0 requeues the job (task.py) within the requeue budget (a time limit alone does not requeue).
No torch.
"""

from __future__ import annotations

import signal
from types import FrameType

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

    def __init__(self, step: int, reason: str, requeued: bool) -> None:
        self.step, self.reason, self.requeued = step, reason, requeued
        action = (
            "requeued" if requeued else "not requeued (continue it with `asrlaunch submit --resume RUN_DIR`)"
        )
        super().__init__(f"stopped at step {step} ({reason}); checkpoint saved; job {action}")
