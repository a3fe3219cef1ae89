"""A run's history, read from its logs once and used by every decision that reads the past: which attempt
starts next, the micro-batch an out-of-memory split chose, whether a failed step is retried, what status
shows, and what the collector merges. No torch.

`RunHistory.read(run_dir)` reads the meta records (starts and events) of every rank and the tail of rank 0's
log (progress); `RunHistory.from_records(records)` takes records already read (the collector reads them all).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from asrlaunch.core.logs import meta_records, read_records, tail_records
from asrlaunch.core.records import Event, Kind, event_of, is_start
from asrlaunch.core.rundir import RunDir


@dataclass
class Attempt:
    """One start of the run's ranks (a job, a requeue, an in-job restart, a `--resume`, a rerun)."""

    number: int
    starts: list[dict[str, Any]] = field(default_factory=list)  # start records, every rank
    events: list[dict[str, Any]] = field(default_factory=list)  # event records, every rank, in order
    records: list[dict[str, Any]] = field(default_factory=list)  # every record read (see RunHistory.read)
    first_time: float | None = None
    last_time: float | None = None
    last_step: int = 0  # the furthest step any record of this attempt names

    def see(self, record: dict[str, Any]) -> None:
        when = float(record["time"])
        self.first_time = when if self.first_time is None else min(self.first_time, when)
        self.last_time = when if self.last_time is None else max(self.last_time, when)
        self.last_step = max(self.last_step, int(record["step"]))
        self.records.append(record)
        if is_start(record):
            self.starts.append(record)
        elif record["kind"] == Kind.META:
            self.events.append(record)

    @property
    def resumed_from(self) -> int:
        return min((int(s.get("resumed_from") or 0) for s in self.starts), default=0)

    @property
    def world_size(self) -> int:
        return max((int(s.get("world_size", 1)) for s in self.starts), default=1)

    @property
    def plan(self) -> dict[str, Any]:
        return dict(self.starts[0]["plan"]) if self.starts else {}

    def of(self, *events: Event) -> list[dict[str, Any]]:
        return [e for e in self.events if event_of(e) in events]

    @property
    def stop(self) -> dict[str, Any] | None:
        """The event that ended this attempt (rank 0's where every rank logged it; a hang before the failure
        it caused), None while it runs or when it ended without a word (a lost node, a killed job)."""
        stops = [e for e in self.events if (kind := event_of(e)) is not None and kind.is_stop]
        return min(stops, key=lambda e: (event_of(e) is not Event.HANG, e["rank"], e["time"]), default=None)

    @property
    def stop_kind(self) -> Event | None:
        return event_of(self.stop) if self.stop else None

    @property
    def final_error(self) -> bool:
        """A rank stopped on an error that no retry can fix (it logged `retry: false`)."""
        return any(e.get("retry") is False for e in self.of(Event.ERROR, Event.CRASH))


@dataclass(frozen=True)
class Progress:
    """The latest figures rank 0 logged."""

    step: int | None = None
    epoch: float | None = None
    loss: float | None = None
    wer: float | None = None
    samples_per_s: float | None = None
    time: float | None = None
    eval_every: int | None = None  # the latest start's eval.steps
    eval_seconds: float | None = None  # the latest evaluation's


class RunHistory:
    def __init__(self, records: Iterable[dict[str, Any]], progress_records: Iterable[dict[str, Any]] = ()):
        by_number: dict[int, Attempt] = {}
        for record in records:
            number = int(record.get("attempt", 0))
            by_number.setdefault(number, Attempt(number)).see(record)
        self.attempts = [by_number[n] for n in sorted(by_number)]
        for attempt in self.attempts:
            attempt.events.sort(key=lambda e: (e["time"], e["rank"]))
        self.progress = _progress(progress_records)

    @classmethod
    def read(cls, run_dir: RunDir) -> RunHistory:
        """Every record of rank 0 (progress, time per attempt), the starts and events of every other rank, and
        their recent train records (compute time per step: stragglers)."""
        logs = run_dir.rank_logs()
        main = list(read_records(logs[0], warn=False)) if 0 in logs else []
        others = [
            record
            for rank, log in logs.items()
            if rank != 0
            for record in [*meta_records(log), *(r for r in tail_records(log) if r["kind"] == Kind.TRAIN)]
        ]
        return cls([*main, *others], main)

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> RunHistory:
        records = list(records)
        return cls(records, [r for r in records if r["rank"] == 0])

    # -- what a new start needs -----------------------------------------------------------------------------
    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def latest_plan(self) -> dict[str, Any]:
        """The plan of the latest attempt that started ({} before any start): an attempt that died while
        starting, logged by failover alone, has none."""
        return next((a.plan for a in reversed(self.attempts) if a.starts), {})

    def next_attempt(self, restart_count: int = 0) -> int:
        """One more than any attempt logged (a resubmitted job's restart count starts again at 0), and never
        less than SLURM's restart count."""
        return max(restart_count, self.attempts[-1].number + 1 if self.attempts else 0)

    def oom_micro_cap(self, max_micro_batch: int | None = None) -> int | None:
        """The smallest micro-batch an out-of-memory split chose: a new start begins there rather than failing
        again (every rank reads the same logs before its own start is logged, so all agree). Splits made under
        another `train.max_micro_batch_size` do not count: a resume that changed it moved to other GPUs."""

        def same_limit(attempt: Attempt) -> bool:
            if max_micro_batch is None or not attempt.starts:
                return True
            train = (attempt.starts[0].get("recipe") or {}).get("train", {})
            return train.get("max_micro_batch_size", max_micro_batch) == max_micro_batch

        splits = [
            e["plan"]["micro_batch"] for a in self.attempts if same_limit(a) for e in a.of(Event.OOM_SPLIT)
        ]
        return min(splits, default=None)

    # -- what happened ------------------------------------------------------------------------------------
    @property
    def starts(self) -> list[tuple[int, int]]:
        """(attempt, the step it resumed from), for every attempt that started."""
        return [(a.number, a.resumed_from) for a in self.attempts if a.starts]

    @property
    def restarts(self) -> list[int]:
        """The step each later attempt resumed from."""
        return [a.resumed_from for a in self.attempts[1:] if a.starts]

    @property
    def stops(self) -> list[Event]:
        return [kind for a in self.attempts if (kind := a.stop_kind) is not None]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for a in self.attempts for e in a.of(Event.FAILURE)]

    @property
    def hangs(self) -> list[dict[str, Any]]:
        return [e for a in self.attempts for e in a.of(Event.HANG)]

    @property
    def last_error(self) -> str:
        """The message of the latest event that explains why the run stopped, since its last start."""
        message = ""
        for attempt in self.attempts:
            if attempt.starts:
                message = ""
            for record in attempt.events:
                explains = event_of(record) not in (Event.OOM_SPLIT, Event.HANG)
                if explains and record.get("error"):
                    message = str(record["error"])
        return message

    def by_attempt(self) -> dict[int, Attempt]:
        return {a.number: a for a in self.attempts}


def _progress(records: Iterable[dict[str, Any]]) -> Progress:
    """Rank 0's latest figures. A start goes back to the step it resumed from: what a failed attempt logged
    past its checkpoint is trained again (its WER too, once evaluated again)."""
    values: dict[str, Any] = defaultdict(lambda: None)
    wer_step = 0
    for record in records:
        if record["rank"] != 0:
            continue
        if is_start(record):
            resumed = int(record.get("resumed_from") or 0)
            values.update(step=resumed, epoch=record.get("epoch"), loss=None, samples_per_s=None)
            values["eval_every"] = (record.get("recipe") or {}).get("eval", {}).get("steps")
            if wer_step > resumed:
                values["wer"] = None
        elif record["kind"] == Kind.TRAIN:
            values.update(
                step=record["step"],
                epoch=record["epoch"],
                loss=record.get("run_loss", record.get("loss")),  # older logs: rank 0's own
                samples_per_s=record.get("samples_per_s"),
                time=record["time"],
            )
        elif record["kind"] == Kind.EVAL:
            values.update(wer=record.get("wer"), step=max(values["step"] or 0, record["step"]))
            values["eval_seconds"] = record.get("eval_seconds")
            wer_step = int(record["step"])
    return Progress(**{k: values[k] for k in Progress.__dataclass_fields__})
