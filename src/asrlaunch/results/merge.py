"""Per-rank logs of every attempt -> one run's merged figures (the results files and the card are written from
them by report.py; their text is table.py's and card.py's). No torch.

Everything here is a pure function of records, except `read_run` and `run_result`, which read a run's logs
(and write nothing). Merging: attempts are taken in order; an attempt that resumed from step s replaces every
record of the earlier attempts after s (the steps it replayed), so the last attempt wins. The train loss of a
step is the mean over the ranks that logged it; evaluation comes from rank 0. Logs whose recipes differ beyond
what a resume may change (core/recipe.py) are refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.goodput import allocated_by_attempt, device_seconds
from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import Kind
from asrlaunch.core.resume import resume_conflicts
from asrlaunch.core.rundir import RunDir
from asrlaunch.results.table import HEADERS, ResultRow, result_rows


class MixedRunsError(ValueError):
    """Logs of different runs were found in one run directory."""


@dataclass(frozen=True)
class MergedRun:
    train: dict[int, float]  # step -> training loss (mean over ranks)
    evals: dict[int, dict[str, float]]  # step -> eval_loss, wer
    steps_per_epoch: int
    meta: list[dict[str, Any]]  # the start records kept, all ranks, all attempts
    restarts: list[int]  # the step each later attempt resumed from
    wall_time_s: float  # the allocated time goodput counts: each attempt from its processes' start, restarts
    device_seconds: float  # in the allocation included, queue time not; each attempt's times its world size
    history: RunHistory


def check_one_run(metas: Sequence[dict[str, Any]]) -> None:
    """MixedRunsError naming the recipe keys in which the logs' start records disagree."""
    differ = resume_conflicts(*(m.get("recipe", {}) for m in metas))
    if differ:
        shown = ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "")
        raise MixedRunsError(
            f"logs of different runs are mixed in one folder (their recipes differ in {shown}): "
            "move each run's logs to its own run directory"
        )


def _number(value: Any) -> float:
    """A logged number; null stands for a non-finite value (the logs are strict JSON)."""
    return float("nan") if value is None else float(value)


def merge_records(records: Iterable[dict[str, Any]]) -> MergedRun:
    """Merge the records of all ranks and attempts of one run (see the module docstring)."""
    records = list(records)
    history = RunHistory.from_records(records)
    metas = [start for attempt in history.attempts for start in attempt.starts]
    check_one_run(metas)
    by_attempt: dict[int, list[dict[str, Any]]] = {a.number: [] for a in history.attempts}
    for record in records:
        by_attempt[int(record.get("attempt", 0))].append(record)
    losses: dict[int, dict[int, float]] = {}  # step -> rank -> loss
    evals: dict[int, dict[str, float]] = {}
    for attempt in history.attempts:
        if attempt.starts:  # an attempt that never started (it failed in start-up) replaces nothing
            for table in (losses, evals):
                for step in [s for s in table if s > attempt.resumed_from]:
                    del table[step]
        for record in by_attempt[attempt.number]:
            if record["kind"] == Kind.TRAIN:
                losses.setdefault(record["step"], {})[record["rank"]] = _number(record["loss"])
            elif record["kind"] == Kind.EVAL and record["rank"] == 0:
                evals[record["step"]] = {
                    "eval_loss": _number(record["eval_loss"]),
                    "wer": _number(record["wer"]),
                }
    plans = [m["plan"]["steps_per_epoch"] for m in metas if "plan" in m]
    return MergedRun(
        train={step: sum(ranks.values()) / len(ranks) for step, ranks in sorted(losses.items())},
        evals=dict(sorted(evals.items())),
        steps_per_epoch=plans[-1] if plans else 1,
        meta=metas,
        restarts=history.restarts,
        wall_time_s=sum(allocated for _, _, allocated, _ in allocated_by_attempt(history)),
        device_seconds=device_seconds(history),
        history=history,
    )


def read_run(run_dir: str | Path | RunDir) -> MergedRun:
    """Read and merge every rank's log of a run; a rank the start records promise but that has no log is
    warned of."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    logs = run.rank_logs()
    if not logs:
        raise FileNotFoundError(f"{run}: no rank logs in {run.logs} (is this a run directory?)")
    merged = merge_records(read_run_logs(run))
    expected = max((m.get("world_size", 1) for m in merged.meta), default=1)
    for rank in sorted(set(range(expected)) - set(logs)):
        warnings.warn(
            f"{run}: no log of rank {rank} ({run.rank_log(rank)}); its losses are left out", stacklevel=2
        )
    return merged


@dataclass(frozen=True)
class RunResult:
    """One run, merged: what every results file and the model card are written from."""

    run_dir: RunDir
    run: MergedRun
    rows: list[ResultRow]

    @property
    def name(self) -> str:
        return str(self.run.meta[-1]["recipe"]["run"]["name"])

    @property
    def final(self) -> ResultRow | None:
        return self.rows[-1] if self.rows else None

    @property
    def best(self) -> ResultRow | None:
        return min(self.rows, key=lambda r: r.wer) if self.rows else None

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [dict(zip(HEADERS, row.values(), strict=True)) for row in self.rows],
            "final": asdict(self.final) if self.final else None,
            "best_wer": self.best.wer if self.best else None,
            "best_step": self.best.step if self.best else None,
            "restarts": self.run.restarts,
        }


def run_result(run_dir: RunDir) -> RunResult:
    """Read and merge a run's logs into its results (ValueError when no rank logged its start)."""
    run = read_run(run_dir)
    if not run.meta:
        raise ValueError(f"{run_dir}: no rank logged its start (meta record); nothing to describe")
    return RunResult(run_dir, run, result_rows(run))
