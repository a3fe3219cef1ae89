"""Preemption and time limits: a signal only sets a flag; the trainer acts on it at a step boundary.

SLURM sends USR2 (`--signal=USR2@<delay>`, submitit's choice) before a time limit, and on preemption when
the controller has `preempt_send_user_signal`. submitit's own handler would checkpoint in the middle of a
step on rank 0 alone; ours replaces it: all ranks agree at the next step boundary, save one checkpoint,
then rank 0 requeues the job with `scontrol requeue` (a time limit alone does not requeue). No torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType

from asrlaunch.scheduler import parse_scontrol_jobs, parse_time_left, run_command

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
        action = "requeued" if requeued else "not requeued (resubmit with launch/submit.py --resume RUN_DIR)"
        super().__init__(f"stopped at step {step} ({reason}); checkpoint saved; job {action}")


def classify_stop(signal_delay_s: int) -> str:
    """'timeout' when the job is within its signal delay of the time limit, else 'preemption'."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "signal"
    try:
        shown = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=15
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "preemption"
    left = parse_time_left(shown.splitlines()[0] if shown.strip() else "")
    return "timeout" if left is not None and left <= signal_delay_s + 30 else "preemption"


def job_preempted() -> bool:
    """SLURM marks a job it preempts (PreemptTime) before the grace time's SIGTERM reaches it."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    jobs = parse_scontrol_jobs(run_command(["scontrol", "show", "job", job_id]) or "")
    return next(iter(jobs.values()), {}).get("PreemptTime", "None") not in ("None", "Unknown", "")


def stop_reason(signum: int | None, signal_delay_s: int) -> str:
    """What a stop signal means. USR2: a time limit or a preemption (by the time left). SIGTERM: a preemption
    when SLURM marked the job preempted (a job that ends inside its grace time is not requeued by SLURM, so
    we requeue it ourselves, as after USR2); otherwise a node lost or the user's signal: `terminated`, which
    we never requeue (SLURM requeues a lost node's job; a user's stays stopped for `--resume`)."""
    if signum == signal.SIGTERM:
        return "preemption" if job_preempted() else "terminated"
    return classify_stop(signal_delay_s)


def requeue_job(restarts_so_far: int, max_requeues: int) -> bool:
    """Ask SLURM to requeue this job (rank 0 only), unless the recipe's requeue budget is spent."""
    return restarts_so_far < max_requeues and requeue_this_job()


def requeue_this_job() -> bool:
    """`scontrol requeue` this job (or this element of a job array); False outside SLURM or when refused."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array_job}_{array_task}" if array_job and array_task else job_id
    done = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
    return done.returncode == 0
