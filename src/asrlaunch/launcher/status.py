"""One line per run: the scheduler's state (scheduler.py) and progress from the logs; `--wait` polls it.

Launcher side: no torch, one scheduler query per source for all runs; of each log, the tail is parsed for
progress and the meta records (starts and stops) of the rest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asrlaunch.core.goodput import Goodput, goodput, stragglers
from asrlaunch.core.history import RunHistory
from asrlaunch.core.records import event_of
from asrlaunch.core.rundir import RunDir, expand_run_dirs
from asrlaunch.job.scheduler import (
    ADMIN_HOLD,
    HELD_STATE,
    NEVER_SATISFIED,
    TERMINAL,
    USER_HOLD,
    JobState,
    local_state,
    slurm_states,
)
from asrlaunch.launcher.preparation import preparation_note

__all__ = ["TERMINAL", "RunStatus", "collect_status", "format_table", "wait_for"]


HELD_WHY = (
    "failover holds a job for a moment to leave a node out of its requeue; a batch script killed meanwhile "
    "leaves it held"
)


@dataclass
class RunStatus:
    run_dir: RunDir
    job_id: str = ""
    job: JobState = field(default_factory=JobState)
    step: int | None = None
    total_steps: int | None = None
    global_batch: int = 32
    epoch: float | None = None
    loss: float | None = None
    wer: float | None = None
    samples_per_s: float | None = None
    eval_every: int | None = None
    eval_seconds: float | None = None
    # (attempt, step it started from) for every start of rank 0; the stop events (timeout, preemption, ...)
    starts: list[tuple[int, int]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    error: str = ""  # the last stop event's message, when it ended the run (e.g. a requeue limit)
    stopped: str = ""  # a stop that checkpointed and was not requeued: where, and the command to continue
    failure: str = ""  # the latest failure: which rank failed first, where, how, and what followed
    preparation: str = ""  # the preparation job, while the training job waits for it (or after it failed)
    slow: list[str] = field(default_factory=list)  # stragglers of the current attempt
    goodput: Goodput | None = None

    @property
    def never_starts(self) -> bool:
        """The job waits on a dependency that failed (its preparation job): SLURM keeps it pending for good,
        unless the site kills such jobs (kill_invalid_depend)."""
        return not self.job.ended and self.job.reason == NEVER_SATISFIED

    @property
    def eta_s(self) -> float | None:
        """The steps left at the latest pace, and the evaluations left (every `eval.steps`, and at the end)
        at the latest one's length: samples/s leaves evaluation out."""
        if self.step is None or self.total_steps is None or not self.samples_per_s:
            return None
        training = (self.total_steps - self.step) * self.global_batch / self.samples_per_s
        if not self.eval_every or self.eval_seconds is None or self.step >= self.total_steps:
            return training
        every, total = self.eval_every, self.total_steps
        evaluations = total // every - self.step // every + (1 if total % every else 0)
        return training + max(0, evaluations) * self.eval_seconds

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **fields,
            "run_dir": str(self.run_dir),
            "job": dataclasses.asdict(self.job),
            "eta_s": self.eta_s,
            "goodput": self.goodput.to_json() if self.goodput else None,
        }

    @property
    def notes(self) -> list[str]:
        """What the table's row cannot say, one line each."""
        lines = [self.preparation, self.error, self.failure, self.stopped, *(f"slow: {s}" for s in self.slow)]
        if self.job.state == HELD_STATE or self.job.reason == USER_HOLD:
            lines.insert(0, f"held: it starts only after `scontrol release {self.job_id}` ({HELD_WHY})")
        elif self.job.reason == ADMIN_HOLD:
            lines.insert(0, "held by an administrator (JobHeldAdmin): only they can release it")
        if self.never_starts:
            lines.append(
                f"its job never starts (a job it depends on failed): scancel {self.job_id}, fix what failed, "
                "and submit again"
            )
        if self.goodput is not None and self.goodput.ratio is not None:
            lines.append(f"goodput: {self.goodput.summary()}")
        return [line for line in lines if line]


def progress_from_logs(status: RunStatus, submitted: float | None = None) -> None:
    """Progress, starts, stops and the last error from the run's history; the total steps from the latest
    start's own plan (the submission's plan.json before any start). `submitted`: when the latest job was."""
    history = RunHistory.read(status.run_dir)
    current = history.current
    plan = history.latest_plan or status.run_dir.read_plan()
    status.total_steps = plan.get("total_steps")
    status.global_batch = plan.get("global_batch", status.global_batch)
    progress = history.progress
    status.step, status.epoch, status.loss = progress.step, progress.epoch, progress.loss
    status.wer, status.samples_per_s = progress.wer, progress.samples_per_s
    status.eval_every, status.eval_seconds = progress.eval_every, progress.eval_seconds
    status.starts = history.starts
    status.stops = [str(kind) for kind in history.stops]
    status.error = history.last_error
    status.failure = failure_line(history)
    status.stopped = stopped_line(history, status.run_dir, submitted)
    status.slow = [s.describe() for s in stragglers(current)]
    status.goodput = goodput(history)


def failure_line(history: RunHistory) -> str:
    """`failure at step 12: rank 1 on node2 first (signal KILL); requeued without node2 (...)`."""
    if not history.failures:
        return ""
    last = history.failures[-1]
    first = ""
    if "first_rank" in last:
        where = f" on {last['first_node']}" if last.get("first_node") else ""
        first = f": rank {last['first_rank']}{where} first ({last.get('first_exit', '?')})"
    action = {"restart": "restarted in the allocation", "requeue": "requeued"}.get(last.get("action", ""), "")
    action = action or ("requeued" if last.get("requeued") else "not retried")
    excluded = last.get("excluded_nodes")
    if excluded:
        action += f" without {', '.join(excluded)} ({last.get('excluded_why', '')})"
    return f"failure at step {last['step']}{first}; {action}"


def stopped_line(history: RunHistory, run_dir: RunDir, submitted: float | None = None) -> str:
    """A stop that checkpointed and stays stopped (the user's scancel, a requeue limit): where it is kept and
    how to continue it. Not one from before the latest job's submission: that job (a `--resume`) is the news,
    even when it failed before its ranks wrote a word."""
    attempt = history.current
    stop = attempt.stop if attempt is not None else None
    kind = event_of(stop) if stop else None
    if stop is None or kind is None or not kind.stopped_by_signal or stop.get("requeued"):
        return ""
    if submitted is not None and float(stop["time"]) < submitted:
        return ""
    kept = (
        "with its checkpoint" if stop.get("checkpointed", True) else "without its checkpoint (see the error)"
    )
    return (
        f"stopped at step {stop['step']} ({kind}) {kept}; continue with: asrlaunch submit --resume {run_dir}"
    )


def collect_status(paths: Sequence[str | Path]) -> list[RunStatus]:
    statuses, preparing = [], {}
    for run_dir in expand_run_dirs([Path(p) for p in paths]):
        jobs = run_dir.jobs()
        training = [j for j in jobs if j.get("role") != "prepare"]
        status = RunStatus(run_dir, job_id=training[-1]["job_id"] if training else "")
        status.job.source = training[-1]["executor"] if training else ""
        if len(jobs) >= 2 and jobs[-2].get("role") == "prepare":  # the latest submission had one
            preparing[str(run_dir)] = jobs[-2]["job_id"]
        progress_from_logs(status, training[-1].get("submitted") if training else None)
        statuses.append(status)
    wanted = [s.job_id for s in statuses if s.job_id and s.job.source == "slurm"]
    slurm = slurm_states([*wanted, *preparing.values()])
    for status in statuses:
        if status.job.source == "slurm":
            # a finished run's job that the scheduler forgot (no accounting, purged) completed all the same
            forgotten = "COMPLETED" if status.run_dir.is_finished() else "UNKNOWN"
            status.job = slurm.get(status.job_id, JobState(forgotten, source="slurm"))
        elif status.job.source == "local":
            status.job = local_state(status.job_id, status.run_dir)
        if str(status.run_dir) in preparing and not status.starts:
            state = slurm.get(preparing[str(status.run_dir)], JobState("UNKNOWN")).state
            status.preparation = preparation_note(status.run_dir, state)
    return statuses


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


HEADER = (
    "RUN",
    "JOB",
    "STATE",
    "NODES",
    "ELAPSED",
    "RESTARTS",
    "RESUMED AT",
    "STOPS",
    "STEP",
    "EPOCH",
    "LOSS",
    "WER",
    "SAMPLES/S",
    "GOODPUT",
    "ETA",
)


def stop_summary(stops: Sequence[str]) -> str:
    """`preemption x2, timeout x1`: every kind of stop is counted apart."""
    counts = {kind: stops.count(kind) for kind in dict.fromkeys(stops)}
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items()) or "-"


def state_text(status: RunStatus) -> str:
    """The state, with the reason a pending job waits (`PENDING (PartitionConfig)`); a job that ended on a
    stop that checkpointed and stays stopped is STOPPED (SLURM says FAILED), not a failure."""
    if status.job.ended and status.stopped:
        return "STOPPED"
    return f"{status.job.state} ({status.job.reason})" if status.job.reason else status.job.state


def table_row(s: RunStatus) -> tuple[str, ...]:
    return (
        str(s.run_dir),
        s.job_id or "-",
        state_text(s),
        s.job.nodes or "-",
        s.job.elapsed or "-",
        _fmt(s.job.restarts),
        ",".join(str(start) for _, start in s.starts[1:]) or "-",
        stop_summary(s.stops),
        f"{_fmt(s.step)}/{_fmt(s.total_steps)}",
        _fmt(s.epoch, ".2f"),
        _fmt(s.loss, ".4f"),
        _fmt(s.wer, ".4f"),
        _fmt(s.samples_per_s, ".1f"),
        f"{s.goodput.ratio:.0%}" if s.goodput and s.goodput.ratio is not None else "-",
        format_duration(s.eta_s) if not s.job.ended else "-",
    )


def format_table(statuses: Sequence[RunStatus]) -> str:
    rows = [HEADER, *(table_row(s) for s in statuses)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    notes = [f"{s.run_dir}: {note}" for s in statuses for note in s.notes]
    return "\n".join(lines + notes)


def wait_for(
    run_dirs: Sequence[RunDir],
    poll_s: float = 2.0,
    on_poll: Callable[[list[RunStatus]], None] | None = None,
    unknown_limit_s: float = 60.0,
) -> list[RunStatus]:
    """Poll until every run's job has ended, waits on a dependency that failed, or has stayed for
    `unknown_limit_s` in a state that is final when it lasts (JobState.may_have_ended)."""
    lasting_since: dict[Path, float] = {}
    while True:
        statuses = collect_status([run.path for run in run_dirs])
        if on_poll is not None:
            on_poll(statuses)
        now = time.monotonic()
        for status in statuses:
            if status.job.may_have_ended:
                lasting_since.setdefault(status.run_dir.path, now)
            else:
                lasting_since.pop(status.run_dir.path, None)
        if all(
            s.job.ended or s.never_starts or now - lasting_since.get(s.run_dir.path, now) > unknown_limit_s
            for s in statuses
        ):
            return statuses
        time.sleep(poll_s)


def progress_line(s: RunStatus) -> str:
    """One run's progress in a line: state, step/total, loss, WER, samples/s, ETA, restarts."""
    eta = format_duration(s.eta_s) if not s.job.ended else "-"
    return (
        f"{state_text(s)} step {_fmt(s.step)}/{_fmt(s.total_steps)} loss {_fmt(s.loss, '.4f')} "
        f"WER {_fmt(s.wer, '.4f')} samples/s {_fmt(s.samples_per_s, '.1f')} ETA {eta} "
        f"restarts {_fmt(s.job.restarts)}"
    )


class WaitProgress:
    """What `--wait` shows while it polls: a tqdm bar per run on a terminal; elsewhere (a batch log, a pipe)
    a plain line per run when its progress changed, and at least every `every_s` seconds."""

    def __init__(self, terminal: bool, every_s: float = 30.0) -> None:
        self.terminal, self.every_s = terminal, every_s
        self.bars: dict[str, Any] = {}
        self.shown: dict[str, tuple[str, float]] = {}

    def __call__(self, statuses: list[RunStatus]) -> None:
        for index, status in enumerate(statuses):
            name, line = str(status.run_dir), progress_line(status)
            if self.terminal:
                self._bar(index, name, status, line)
                continue
            previous = self.shown.get(name)
            if previous is None or previous[0] != line or time.monotonic() - previous[1] >= self.every_s:
                print(f"[wait] {name}: {line}", flush=True)
                self.shown[name] = (line, time.monotonic())

    def _bar(self, index: int, name: str, status: RunStatus, line: str) -> None:
        from tqdm import tqdm

        bar = self.bars.get(name)
        if bar is None:
            bar = self.bars[name] = tqdm(desc=name, position=index, unit="step", dynamic_ncols=True)
        bar.total = status.total_steps
        bar.n = status.step or 0
        bar.set_postfix_str(line.split(" step ")[0] + " " + line.split(" loss ", 1)[-1], refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
