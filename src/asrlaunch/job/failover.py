"""After the job step: a failed step is restarted inside the allocation, or requeued without the node that
failed, within budgets, and only while the run makes progress. No torch.

The sbatch script runs this after each srun (submitit's teardown lines, see launcher/submission.py):

    python -m asrlaunch failover --exit-status $? --restarts N RUN_DIR [RUN_DIR ...]   (arrays: every element)

A step that ended well, a stop already handled (timeout, preemption, signal, terminated: checkpointed,
requeued or not by the trainer), a finished run, and an error no retry can fix (a bad recipe or corpus,
divergence, a full disk, the requeue limit: the trainer logs them with `retry: false`) are left alone.
Anything else (a rank killed, a hang the supervisor ended, a crash, a lost node) is a failure, logged as a
`failure` event naming the rank that failed first, its node, how it ended and its last output (triage.py),
then:
- never twice in a row at the same step without progress in between: a fault that repeats is a bug;
- restarted in this allocation (exit status 75 to the batch script, which runs srun again) while fewer than
  `cluster.max_restarts_in_job` restarts happened in this job, no node of the job is down or drained, and
  the job has time left to start again before its stop signal;
- else requeued, within `cluster.max_failures` requeues after failures, with the node the failure points at
  excluded (`ExcNodeList`) as long as the job still fits on the partition's other nodes.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.exits import ExitCode
from asrlaunch.core.history import Attempt, RunHistory
from asrlaunch.core.logs import RankLog
from asrlaunch.core.recipe import ClusterSection, RecipeError, load_run_recipe
from asrlaunch.core.records import Event, event_of
from asrlaunch.core.rundir import RunDir, SweepDir
from asrlaunch.job.task import SIGNAL_EARLY_S, SlurmTask, within_requeue_budget
from asrlaunch.job.triage import FirstFailure, first_failure, partition_room, unhealthy_nodes

# Job states in which the scheduler, or the user, already decided what comes next.
DECIDED_STATES = ("CANCELLED", "PREEMPTED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "NODE_FAIL")
RESTART, REQUEUE, NONE = "restart", "requeue", "none"


@dataclass(frozen=True)
class Verdict:
    """What to do about a step that exited (`restart`, `requeue` or `none`), and the fields of the failure to
    log (None: nothing happened that is ours to handle)."""

    action: str
    record: dict[str, Any] | None
    attempt: Attempt | None = None  # the attempt the step ran, the failure's (with a record)

    @property
    def requeue(self) -> bool:
        return self.action == REQUEUE


def handled(attempt: Attempt) -> bool:
    """The ranks stopped on a signal (and logged it), the step was already judged, or a rank stopped on an
    error no retry can fix."""
    kinds = [event_of(record) for record in attempt.events]
    signalled = any(kind is not None and kind.stopped_by_signal for kind in kinds)
    return attempt.final_error or bool(attempt.of(Event.FAILURE)) or signalled


def requeued_failures(history: RunHistory, job_id: str | None = None) -> list[dict[str, Any]]:
    """Failures after which `job_id` (None: any job) went back to the queue: the failure budget is a job's,
    and a job resubmitted with --resume starts with a new one. Older records have `requeued` only."""
    return [
        f
        for f in history.failures
        if f.get("action", REQUEUE if f.get("requeued") else NONE) == REQUEUE
        and (job_id is None or f.get("job_id", job_id) == job_id)
    ]


def step_attempt(history: RunHistory, step_start: float, restart_count: int = 0) -> Attempt | None:
    """The attempt this job step ran: the newest, when its ranks logged anything since the step started; else
    (the step failed while starting: out of memory loading a checkpoint, a bad GPU, srun unable to launch) a
    new, empty attempt at the step the run had reached, so that the failure is this step's, not the one
    before it (which may have ended well, or been handled)."""
    last = history.current
    if last is None and not step_start:
        return None
    if last is not None and (began := _began(last)) is not None and began >= step_start:
        return last
    return Attempt(history.next_attempt(restart_count), last_step=last.last_step if last else 0)


def _began(attempt: Attempt) -> float | None:
    """When the attempt's first record was written, on the batch script's clock: rank 0 runs on the job's
    first node, where the batch script runs; another node's clock may be seconds off."""
    times = [float(r["time"]) for r in attempt.records if int(r.get("rank", 0)) == 0]
    return min(times, default=attempt.first_time)


def decide(
    history: RunHistory,
    exit_status: int,
    finished: bool,
    cluster: ClusterSection,
    restarts_in_job: int = 0,
    state: str = "",
    bad_nodes: Sequence[str] = (),
    step_start: float = 0.0,
    task: SlurmTask | None = None,
    time_left: float | None = None,
) -> Verdict:
    """The pure decision, from the run's history, the job's state, the restarts this job has had, the job's
    nodes that SLURM set down or drained (a restart would run on them again), when this step started, the
    job's ids and requeues so far (`task`) and its time left (seconds; None: unknown or unlimited)."""
    task = task or SlurmTask()
    attempt = step_attempt(history, step_start, task.restart_count)
    if exit_status == 0 or finished or state in DECIDED_STATES or attempt is None or handled(attempt):
        return Verdict(NONE, None)
    failures, step = history.failures, attempt.last_step
    reported = [f"rank {e['rank']}: {e.get('error', '')}" for e in attempt.of(Event.ERROR, Event.CRASH)][:4]
    record: dict[str, Any] = {"exit_status": exit_status, "failures": len(failures) + 1, "errors": reported}
    # An out-of-memory split is progress: the next start runs the same step with half the micro-batch (at 1,
    # an out-of-memory error logs no split, and the rule applies again).
    if failures and int(failures[-1]["step"]) == step and not attempt.of(Event.OOM_SPLIT):
        record["error"] = (
            f"the job failed twice in a row at step {step} without progress in between: a fault that "
            "repeats at the same place is a bug, not bad luck; see the errors in its submitit/ logs"
        )
        return Verdict(NONE, {**record, "action": NONE, "requeued": False, "retry": False}, attempt)
    restartable = restarts_in_job < cluster.max_restarts_in_job and not bad_nodes
    timely = restart_has_time(cluster, time_left)
    if restartable and timely:
        return Verdict(RESTART, {**record, "action": RESTART, "requeued": False}, attempt)
    refusal = requeue_refusal(history, cluster, task, restarts_in_job)
    if refusal and restartable:  # too near the time limit, and no requeue left: the allocation's last chance
        return Verdict(RESTART, {**record, "action": RESTART, "requeued": False, "late": True}, attempt)
    if refusal:
        return Verdict(
            NONE, {**record, "action": NONE, "requeued": False, "retry": False, "error": refusal}, attempt
        )
    late = {"late": True} if restartable else {}  # requeued for its time, not its node: none is left out
    return Verdict(REQUEUE, {**record, "action": REQUEUE, "requeued": True, **late}, attempt)


def requeue_refusal(history: RunHistory, cluster: ClusterSection, task: SlurmTask, restarts: int) -> str:
    """Why this failure may not be requeued (the requeue budget, the failure budget), or ""."""
    if not within_requeue_budget(task.restart_count + 1, cluster.max_requeues):
        return (
            f"the job failed after {task.restart_count} requeue(s), the most cluster.max_requeues="
            f"{cluster.max_requeues} allows; look at the errors in its submitit/ logs, then resubmit with "
            "`asrlaunch submit --resume`"
        )
    if len(requeued_failures(history, task.job_id)) >= cluster.max_failures:
        return (
            f"the job failed {len(history.failures) + 1} times, more than cluster.max_failures="
            f"{cluster.max_failures} (after {restarts} restart(s) in its allocation); look at the errors in "
            "its submitit/ logs, then resubmit with `asrlaunch submit --resume`"
        )
    return ""


# What a restarted step needs before its stop signal could be acted on: start-up, a checkpoint to resume.
RESTART_STARTUP_S = 120.0


def restart_has_time(cluster: ClusterSection, time_left: float | None) -> bool:
    """SLURM sends the stop signal before the time limit once (up to SIGNAL_EARLY_S early): a step restarted
    later than that, or too close to it to start up first, would reach the limit without a checkpoint and end
    as TIMEOUT, which nothing requeues. Such a step is requeued instead, while a requeue is allowed."""
    return time_left is None or time_left > cluster.signal_delay_s + SIGNAL_EARLY_S + RESTART_STARTUP_S


def requeue(first: FirstFailure | None, bad_nodes: Sequence[str], task: SlurmTask) -> dict[str, Any]:
    """Requeue the job, leaving out the node the failure points at (one SLURM set down or drained, else the
    node of the rank that failed first) when the job still fits on the partition without it."""
    nodes = list(bad_nodes)
    why = "SLURM set it down or drained it" if nodes else ""
    if not nodes and first is not None and first.node:
        nodes, why = [first.node], f"rank {first.rank} failed there first ({first.exit})"
    room = partition_room(task, nodes) if nodes else None
    if nodes and room is not None and room < 0:
        kept = {"excluded_why": f"{', '.join(nodes)} kept: {why}, but the job would not fit without it"}
        return {"requeued": task.requeue(), **kept}
    requeued, excluded = task.requeue_without(nodes)
    return {"requeued": requeued, **({"excluded_nodes": nodes, "excluded_why": why} if excluded else {})}


def handle(
    run_dir: RunDir, submitit: Path, exit_status: int, restarts: int, task: SlurmTask, step_start: float = 0.0
) -> Verdict:
    try:
        cluster = load_run_recipe(run_dir.recipe).cluster
    except RecipeError:
        cluster = ClusterSection(max_failures=0, max_restarts_in_job=0)
    history = RunHistory.read(run_dir)
    bad_nodes = unhealthy_nodes(task)
    finished, state = run_dir.is_finished(), task.state()
    left = task.time_left()
    verdict = decide(
        history, exit_status, finished, cluster, restarts, state, bad_nodes, step_start, task, left
    )
    attempt = verdict.attempt
    if verdict.record is None or attempt is None:
        return verdict
    first = first_failure(run_dir, attempt, submitit, task)
    record = {**verdict.record, "job_id": task.job_id, **(first.fields() if first else {})}
    if verdict.action == REQUEUE:
        record.update(requeue(None if record.get("late") else first, bad_nodes, task))
    with RankLog(run_dir, 0, attempt=attempt.number) as log:
        plan = history.latest_plan
        epoch = attempt.last_step / max(1, plan.get("steps_per_epoch", 1))
        log.event(Event.FAILURE, attempt.last_step, epoch, **record)
    return Verdict(verdict.action, record, attempt)


def pick(run_dirs: Sequence[str], task: SlurmTask) -> tuple[RunDir, Path]:
    """The run of this job (a job array's element by its index) and the submitit folder of the job."""
    run_dir = RunDir(Path(run_dirs[task.array_index if len(run_dirs) > 1 else 0]))
    submitit = SweepDir(run_dir.path.parent).submitit if len(run_dirs) > 1 else run_dir.submitit
    return run_dir, submitit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch failover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exit-status", type=int, required=True, help="srun's exit status")
    parser.add_argument("--restarts", type=int, default=0, help="restarts in this allocation so far")
    parser.add_argument("--step-start", type=float, default=0.0, help="when srun started (epoch seconds)")
    parser.add_argument("run_dirs", nargs="+", help="the job's run directory (a job array: every element's)")
    args = parser.parse_args(argv)
    # Our own `scontrol requeue` SIGTERMs this batch step at once: without this, the failure record written
    # after it was lost now and then (SIGKILL follows only after KillWait, time enough to write one line).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    task = SlurmTask.from_environ()
    run_dir, submitit = pick(args.run_dirs, task)
    verdict = handle(run_dir, submitit, args.exit_status, args.restarts, task, args.step_start)
    if verdict.record is not None:
        what = {RESTART: "restarting it in this allocation", REQUEUE: "requeued", NONE: "not retried"}
        reason = verdict.record.get("error", "") or verdict.record.get("first_exit", "")
        print(
            f"asrlaunch: step failed (exit {args.exit_status}); {what[verdict.action]}: {reason}",
            file=sys.stderr,
            flush=True,
        )
    return ExitCode.RESTART if verdict.action == RESTART else args.exit_status


if __name__ == "__main__":
    sys.exit(main())
