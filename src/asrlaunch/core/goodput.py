"""How much of a run's time trained, what the rest went to, and which rank is slow: pure functions of its
history (history.py). No torch.

Goodput is the time spent in steps that count (not replayed by a later attempt) over the allocated wall time
of all attempts: each attempt from its processes' start to its last record, plus the restarts inside an
allocation. The lost time is split by cause: start-up (process start to the first step), replayed steps,
checkpoint writes, evaluation, hangs (the hung step's silence before the supervisor ended it), restarts in
the allocation, and the rest (the final save, teardown); requeue waits (a requeued job back in the queue) are
outside any allocation and reported beside it. A straggler is a rank whose median compute time per step is at
least 1.25x the median of the others.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from asrlaunch.core.history import Attempt, RunHistory
from asrlaunch.core.records import Event, Kind

SLOW_RATIO = 1.25
CAUSES = ("startup", "replayed", "checkpoint", "eval", "hang", "restart", "other")


@dataclass(frozen=True)
class AttemptTime:
    number: int
    begin: float
    end: float
    startup: float
    training: float  # in steps, replayed ones included
    eval: float
    checkpoint: float
    hang: float
    steps: tuple[int, int] | None  # (resumed from, last step trained); None: it never started training

    @property
    def wall(self) -> float:
        return max(0.0, self.end - self.begin)


@dataclass(frozen=True)
class Goodput:
    productive_s: float
    allocated_s: float
    lost_s: dict[str, float] = field(default_factory=dict)
    requeue_wait_s: float = 0.0

    @property
    def ratio(self) -> float | None:
        return self.productive_s / self.allocated_s if self.allocated_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}

    def summary(self) -> str:
        """`87.5% of 1:02:03 trained; lost: startup 0:01:10, replayed 0:00:40 ...`"""
        if self.ratio is None:
            return "-"
        lost = ", ".join(f"{cause} {clock(s)}" for cause, s in self.lost_s.items() if s >= 0.5)
        waits = f"; requeue waits {clock(self.requeue_wait_s)}" if self.requeue_wait_s >= 0.5 else ""
        return f"{self.ratio:.1%} of {clock(self.allocated_s)} trained; lost: {lost or 'nothing'}{waits}"


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def rank0(attempt: Attempt, kind: Kind) -> list[dict[str, Any]]:
    return [r for r in attempt.records if r["rank"] == 0 and r["kind"] == kind]


def attempt_time(attempt: Attempt) -> AttemptTime | None:
    starts = [s for s in attempt.starts if s["rank"] == 0] or attempt.starts
    if attempt.last_time is None:
        return None
    hang = sum(float(e.get("stale_s") or 0.0) for e in attempt.of(Event.HANG))
    if not starts:  # it hung or died while starting: allocated from its processes' start, or as far back as
        end = float(attempt.last_time)  # its hang reaches
        started = [float(e["process_started"]) for e in attempt.events if e.get("process_started")]
        begin = min(float(attempt.first_time or end), end - hang, *started)
        return AttemptTime(attempt.number, begin, end, 0.0, 0.0, 0.0, 0.0, hang, None)
    begin = min(float(s.get("process_started") or s["time"]) for s in attempt.starts)
    global_batch = int(starts[0].get("plan", {}).get("global_batch", 1))
    training, previous, last, rate = 0.0, attempt.resumed_from, attempt.resumed_from, None
    for record in rank0(attempt, Kind.TRAIN):
        steps = max(0, int(record["step"]) - previous)
        if record.get("samples_per_s"):
            rate = float(record["samples_per_s"])
            training += steps * global_batch / rate
        previous = last = int(record["step"])
    stop, kind = attempt.stop, attempt.stop_kind
    kept = stop is not None and kind is not None and kind.stopped_by_signal and stop.get("checkpointed", True)
    if stop is not None and kept and rate and int(stop["step"]) > last:
        # The steps after the last window, checkpointed at the stop: trained, at the last window's pace.
        training += (int(stop["step"]) - last) * global_batch / rate
        last = int(stop["step"])
    checkpoints = [e for e in attempt.of(Event.CHECKPOINT) if e["rank"] == 0]
    return AttemptTime(
        attempt.number,
        begin,
        float(attempt.last_time),
        max(0.0, float(starts[0]["time"]) - begin),
        training,
        sum(float(r.get("eval_seconds") or 0.0) for r in rank0(attempt, Kind.EVAL)),
        sum(float(e.get("seconds") or 0.0) for e in checkpoints),
        hang,
        (attempt.resumed_from, last),
    )


def restarted_in_allocation(attempt: Attempt) -> bool:
    return any(f.get("action") == "restart" for f in attempt.of(Event.FAILURE))


def allocated_by_attempt(history: RunHistory) -> list[tuple[Attempt, AttemptTime, float, float]]:
    """Each attempt with its times, the allocation it held (its wall time, plus the restart in the same
    allocation that followed it) and the wait in the queue that followed it."""
    times = [(a, t) for a in history.attempts if (t := attempt_time(a)) is not None]
    rows = []
    for index, (attempt, time) in enumerate(times):
        following = times[index + 1][1] if index + 1 < len(times) else None
        gap = max(0.0, following.begin - time.end) if following is not None else 0.0
        restarted = restarted_in_allocation(attempt)
        rows.append((attempt, time, time.wall + (gap if restarted else 0.0), 0.0 if restarted else gap))
    return rows


def device_seconds(history: RunHistory) -> float:
    """Device time the run held: each attempt's allocation times its world size (an attempt that died before
    its start record, the world size of the attempt before it)."""
    total, world = 0.0, 1
    for attempt, _, allocated, _ in allocated_by_attempt(history):
        world = attempt.world_size if attempt.starts else world
        total += world * allocated
    return total


def goodput(history: RunHistory) -> Goodput:
    rows = allocated_by_attempt(history)
    times = [time for _, time, _, _ in rows]
    lost = dict.fromkeys(CAUSES, 0.0)
    productive = allocated = waits = 0.0
    for index, (_, time, held, wait) in enumerate(rows):
        # Steps past any later resume point were trained again (a resume may fall back past a bad checkpoint).
        resumed = min((t.steps[0] for t in times[index + 1 :] if t.steps is not None), default=None)
        if time.steps is not None:
            trained = time.steps[1] - time.steps[0]
            end = time.steps[1] if resumed is None else min(time.steps[1], resumed)
            share = max(0, end - time.steps[0]) / trained if trained > 0 else 0.0
            productive += time.training * share
            lost["replayed"] += time.training * (1 - share)
        lost["startup"] += time.startup
        lost["eval"] += time.eval
        lost["checkpoint"] += time.checkpoint
        lost["hang"] += time.hang
        used = time.startup + time.training + time.eval + time.checkpoint + time.hang
        lost["other"] += max(0.0, time.wall - used)
        lost["restart"] += held - time.wall
        allocated += held
        waits += wait
    return Goodput(productive, allocated, lost, waits)


def compute_medians(attempt: Attempt) -> dict[int, float]:
    """Each rank's median compute time per step over the attempt's train records."""
    per_rank: dict[int, list[float]] = {}
    for record in attempt.records:
        if record["kind"] == Kind.TRAIN and record.get("compute_s"):
            per_rank.setdefault(int(record["rank"]), []).append(float(record["compute_s"]))
    return {rank: statistics.median(values) for rank, values in per_rank.items()}


@dataclass(frozen=True)
class Straggler:
    rank: int
    node: str | None
    ratio: float

    def describe(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return f"rank {self.rank}{where} computes {self.ratio:.2f}x the median of the others"


def stragglers(attempt: Attempt | None) -> list[Straggler]:
    if attempt is None:
        return []
    medians = compute_medians(attempt)
    if len(medians) < 2:
        return []
    nodes = {int(s["rank"]): s.get("node") or s.get("host") for s in attempt.starts}
    slow = []
    for rank, median in sorted(medians.items()):
        others = statistics.median(m for r, m in medians.items() if r != rank)
        if others > 0 and median >= SLOW_RATIO * others:
            slow.append(Straggler(rank, nodes.get(rank), median / others))
    return slow


def slow_nodes(attempt: Attempt | None) -> list[str]:
    """Nodes all of whose ranks are stragglers (a throttled GPU or a bad link is a node's, not a rank's)."""
    if attempt is None:
        return []
    slow = stragglers(attempt)
    nodes = {int(s["rank"]): s.get("node") for s in attempt.starts}
    by_node: dict[str, set[int]] = {}
    for rank, node in nodes.items():
        if node:
            by_node.setdefault(node, set()).add(rank)
    slow_ranks = {s.rank for s in slow}
    return sorted(node for node, ranks in by_node.items() if ranks <= slow_ranks and len(by_node) > 1)


def stop_history(history: RunHistory) -> list[tuple[int, str, int, float]]:
    """(attempt, how it ended, the step it reached, the time it cost the run): the time of the steps the next
    attempt replayed, the wait until it started, and its start-up."""
    times = {t.number: t for a in history.attempts if (t := attempt_time(a)) is not None}
    rows = []
    ordered = [a for a in history.attempts if a.number in times]
    for index, (attempt, following) in enumerate(itertools.pairwise(ordered)):
        ended = attempt.stop_kind or (Event.HANG if attempt.of(Event.HANG) else None)
        now, later = times[attempt.number], times[following.number]
        resumed = next((t.steps[0] for a in ordered[index + 1 :] if (t := times[a.number]).steps), None)
        trained = now.steps[1] - now.steps[0] if now.steps else 0
        replayed = max(0, now.steps[1] - resumed) if now.steps and resumed is not None else 0
        cost = (now.training * replayed / trained if trained else 0.0) + max(0.0, later.begin - now.end)
        rows.append((attempt.number, str(ended or "ended"), attempt.last_step, cost + later.startup))
    return rows
