"""After the job step: a failed job is requeued, within a budget, and only while it makes progress. No torch.

The sbatch script runs this after srun returns (submitit's teardown lines, see cluster.py):

    python -m asrlaunch.failover --exit-status $? RUN_DIR [RUN_DIR ...]      (a job array: one per element)

A step that ended well, a stop that was already handled (timeout, preemption, signal: checkpointed, requeued
or not by the trainer), a finished run, and an error that a retry cannot fix (a bad recipe or corpus,
divergence, a full disk, the requeue limit: the trainer logs them with `retry: false`) are left alone.
Anything else is a failure (a rank killed, a node lost, a crash): it is logged as a `meta` record with
`event: failure`, and the job is requeued to resume from its newest complete checkpoint, unless
`cluster.max_failures` failures happened already, or the previous failure stopped at the same step (no
progress in between: a bug, not bad luck).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.logs import RankLog, is_start, meta_records, slurm_restart_count, tail_records
from asrlaunch.recipe import RecipeError, load_recipe
from asrlaunch.rundir import RunDir
from asrlaunch.scheduler import parse_scontrol_jobs, run_command
from asrlaunch.signals import requeue_this_job

STOP_EVENTS = ("timeout", "preemption", "signal", "terminated")
# Job states in which the scheduler, or the user, already decided what comes next.
DECIDED_STATES = ("CANCELLED", "PREEMPTED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "NODE_FAIL")


@dataclass(frozen=True)
class Verdict:
    """What to do about a step that exited: `requeue`, and the record to log (None: nothing happened)."""

    requeue: bool
    record: dict[str, Any] | None


def last_step(run_dir: RunDir, attempt: int) -> int:
    """The furthest step the attempt reached, from rank 0's records (its start if it logged nothing else)."""
    records = [r for r in tail_records(run_dir.rank_log(0)) if r["attempt"] == attempt]
    records += [r for r in meta_records(run_dir.rank_log(0)) if r["attempt"] == attempt]
    return max((int(r["step"]) for r in records), default=0)


def job_state() -> str:
    """This job's state as the controller sees it now (a user's scancel shows as CANCELLED)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return ""
    jobs = parse_scontrol_jobs(run_command(["scontrol", "show", "job", job_id]) or "")
    return next(iter(jobs.values()), {}).get("JobState", "")


def decide(
    metas: Sequence[dict[str, Any]],
    exit_status: int,
    finished: bool,
    max_failures: int,
    step: int,
    state: str = "",
) -> Verdict:
    """The pure decision, from the meta records of every rank and attempt (see the module docstring) and the
    job's state (a cancelled, preempted or already requeued job is left to the scheduler)."""
    if exit_status == 0 or finished or state in DECIDED_STATES:
        return Verdict(False, None)
    attempt = max((int(m["attempt"]) for m in metas), default=0)
    current = [m for m in metas if m["attempt"] == attempt]
    if any(m.get("event") in STOP_EVENTS for m in current):
        return Verdict(False, None)
    errors = [m for m in current if m.get("event") in ("error", "crash")]
    if any(m.get("retry") is False for m in errors):
        return Verdict(False, None)
    failures = [m for m in metas if m.get("event") == "failure"]
    reported = [f"rank {m['rank']}: {m.get('error', '')}" for m in errors][:4]
    record: dict[str, Any] = {"exit_status": exit_status, "failures": len(failures) + 1, "errors": reported}
    if len(failures) >= max_failures:
        record["error"] = (
            f"the job failed {len(failures) + 1} times, more than cluster.max_failures={max_failures}; "
            "look at the errors in its submitit/ logs, then resubmit with launch/submit.py --resume"
        )
        return Verdict(False, {**record, "requeued": False, "retry": False})
    if failures and int(failures[-1]["step"]) == step:
        record["error"] = (
            f"the job failed twice in a row at step {step} without progress in between: a fault that "
            "repeats at the same place is a bug, not bad luck; see the errors in its submitit/ logs"
        )
        return Verdict(False, {**record, "requeued": False, "retry": False})
    return Verdict(True, {**record, "requeued": True})


def handle(run_dir: RunDir, exit_status: int) -> Verdict:
    try:
        max_failures = load_recipe(run_dir.recipe).cluster.max_failures
    except RecipeError:
        max_failures = 0
    metas = [m for log in run_dir.rank_logs().values() for m in meta_records(log)]
    attempt = max((int(m["attempt"]) for m in metas), default=slurm_restart_count())
    step = last_step(run_dir, attempt)
    verdict = decide(metas, exit_status, run_dir.is_finished(), max_failures, step, job_state())
    if verdict.record is None:
        return verdict
    record = dict(verdict.record)
    if verdict.requeue:
        record["requeued"] = requeue_this_job()
    started = [m for m in metas if is_start(m) and m["attempt"] == attempt]
    with RankLog(run_dir, 0, attempt=attempt) as log:
        epoch = step / max(1, started[-1]["plan"]["steps_per_epoch"]) if started else 0.0
        log.write("meta", step, epoch, event="failure", **record)
    return verdict


def pick(run_dirs: Sequence[str]) -> RunDir:
    """The run of this job: the only one, or a job array's element by SLURM_ARRAY_TASK_ID."""
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    return RunDir(Path(run_dirs[index if len(run_dirs) > 1 else 0]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exit-status", type=int, required=True, help="srun's exit status")
    parser.add_argument("run_dirs", nargs="+", help="the job's run directory (a job array: every element's)")
    args = parser.parse_args(argv)
    # Our own `scontrol requeue` SIGTERMs this batch step at once: without this, the failure record written
    # after it was lost now and then (SIGKILL follows only after KillWait, time enough to write one line).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_dir = pick(args.run_dirs)
    verdict = handle(run_dir, args.exit_status)
    if verdict.record is not None:
        action = "requeued" if verdict.requeue else "not requeued"
        reason = verdict.record.get("error", "")
        print(
            f"asrlaunch: step failed (exit {args.exit_status}); {action}: {reason}",
            file=sys.stderr,
            flush=True,
        )
    return args.exit_status


if __name__ == "__main__":
    sys.exit(main())
