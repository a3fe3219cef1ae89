"""Goodput and stragglers: how much of the allocation trained and what the rest went to, on made-up histories;
a straggler (its forward passes or its data slowed) named by status and the collector after a real two-process
run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from asrlaunch.core.goodput import goodput, stop_history, stragglers
from asrlaunch.core.history import RunHistory
from asrlaunch.core.rundir import RunDir

from .conftest import PYTHON, engine_command, python_env

PLAN = {"global_batch": 8, "steps_per_epoch": 10}


def record(kind: str, attempt: int, step: int, time: float, **fields: object) -> dict:
    """One of rank 0's records as the logs hold it."""
    return {"kind": kind, "step": step, "epoch": 0.0, "rank": 0, "attempt": attempt, "time": time, **fields}


def start(attempt: int, started: float, time: float, resumed: int | None = None) -> dict:
    return record(
        "meta", attempt, resumed or 0, time, process_started=started, plan=PLAN, resumed_from=resumed
    )


def train(attempt: int, step: int, time: float, samples_per_s: float = 4.0) -> dict:
    return record("train", attempt, step, time, samples_per_s=samples_per_s)


def history_of(*records: dict) -> RunHistory:
    return RunHistory.from_records(list(records))


def test_goodput_splits_the_lost_time_by_cause() -> None:
    history = history_of(
        start(0, 100.0, 110.0),
        train(0, 10, 130.0),
        record("meta", 0, 10, 131.0, event="checkpoint", seconds=1.0),
        train(0, 20, 151.0),
        record("meta", 0, 20, 190.0, event="hang", stale_s=35.0),
        record("meta", 0, 20, 195.0, event="failure", action="restart"),
        start(1, 200.0, 205.0, resumed=10),
        train(1, 30, 245.0),
        record("eval", 1, 30, 250.0, eval_seconds=5.0),
    )
    result = goodput(history)
    # attempt 0: 40 s of steps, of which 10 steps (20 s) were replayed by attempt 1; attempt 1: 40 s
    assert result.productive_s == pytest.approx(60.0) and result.lost_s["replayed"] == pytest.approx(20.0)
    assert result.lost_s["startup"] == pytest.approx(15.0) and result.lost_s["checkpoint"] == 1.0
    assert result.lost_s["hang"] == 35.0 and result.lost_s["eval"] == 5.0
    assert result.lost_s["restart"] == pytest.approx(5.0)  # 195 -> 200, inside the allocation
    assert result.allocated_s == pytest.approx(95.0 + 5.0 + 50.0) and result.requeue_wait_s == 0.0
    assert result.ratio == pytest.approx(60.0 / 150.0)
    assert "40.0% of 0:02:30 trained" in result.summary()
    ((attempt, kind, step, cost),) = stop_history(history)
    assert (attempt, kind, step) == (0, "hang", 20) and cost == pytest.approx(20.0 + 5.0 + 5.0)


def test_the_steps_after_the_last_window_that_a_stop_checkpointed_are_productive() -> None:
    """Logging every 10 steps, a preemption at step 15: steps 11-15 were trained and kept (the next attempt
    resumes there), at the last window's pace: productive, not 'other'."""
    history = history_of(
        start(0, 100.0, 100.0),
        train(0, 10, 120.0),
        record("meta", 0, 15, 131.0, event="preemption", requeued=True),
        start(1, 200.0, 200.0, resumed=15),
        train(1, 20, 210.0),
    )
    result = goodput(history)
    assert result.productive_s == pytest.approx(20.0 + 10.0 + 10.0)  # steps 1-10, 11-15, 16-20 at 2 s each
    assert result.lost_s.get("replayed", 0.0) == 0.0
    unsaved = record("meta", 0, 15, 131.0, event="preemption", requeued=True, checkpointed=False)
    lost = history_of(start(0, 100.0, 100.0), train(0, 10, 120.0), unsaved)
    assert goodput(lost).productive_s == pytest.approx(20.0)  # its checkpoint failed: 11-15 were not kept


def test_an_attempt_that_hung_while_starting_counts_its_allocated_time() -> None:
    """Preempted, requeued, then 600 s hung in start-up (no start record: only the hang and the failure),
    restarted in the allocation: those 600 s were allocated and lost to the hang, not a requeue wait."""
    history = history_of(
        start(0, 100.0, 105.0),
        train(0, 10, 130.0),
        record("meta", 0, 10, 131.0, event="preemption"),
        record("meta", 1, 10, 1000.0, event="hang", stale_s=600.0),
        record("meta", 1, 10, 1005.0, event="failure", action="restart"),
        start(2, 1010.0, 1015.0, resumed=10),
        train(2, 20, 1035.0),
    )
    result = goodput(history)
    assert result.productive_s == pytest.approx(40.0) and result.lost_s["hang"] == 600.0
    assert result.allocated_s == pytest.approx(31.0 + 600.0 + 5.0 + 25.0)
    assert result.requeue_wait_s == pytest.approx(274.0)  # 131 -> 405, where the hang's 600 s began
    assert result.lost_s["restart"] == 5.0
    assert stop_history(history) == [(0, "preemption", 10, 274.0), (1, "hang", 10, 10.0)]


def test_steps_a_later_resume_replays_are_not_productive_though_the_next_attempt_kept_them() -> None:
    """0 -> 20, then 20 -> 30 (its step-20 checkpoint is found corrupt later), then 10 -> 40: the first
    attempt's steps 10-20 were trained twice."""

    def attempt(number: int, at: float, resumed: int, reached: int) -> list[dict]:
        return [
            start(number, at, at, resumed=resumed or None),
            train(number, reached, at + 10.0, samples_per_s=8.0 * (reached - resumed) / 10.0),
            record("meta", number, reached, at + 10.0, event="preemption"),
        ]

    history = history_of(*attempt(0, 0.0, 0, 20), *attempt(1, 100.0, 20, 30), *attempt(2, 200.0, 10, 40))
    result = goodput(history)
    assert result.productive_s == pytest.approx(5.0 + 0.0 + 10.0)  # 0-10 of the first, 10-40 of the last
    assert result.lost_s["replayed"] == pytest.approx(5.0 + 10.0)


def test_an_attempt_that_died_while_starting_counts_from_its_process_start() -> None:
    """Requeued, then 1500 s preparing a corpus that ends in an error, before any start record: allocated."""
    history = history_of(
        start(0, 100.0, 105.0),
        train(0, 10, 130.0),
        record("meta", 0, 10, 131.0, event="preemption"),
        record(
            "meta", 1, 0, 2000.0, event="error", error="DataError: ...", retry=False, process_started=500.0
        ),
    )
    result = goodput(history)
    assert result.allocated_s == pytest.approx(31.0 + 1500.0)
    assert result.requeue_wait_s == pytest.approx(500.0 - 131.0)


@pytest.mark.parametrize("fault", ["slow@rank=1,factor=3", "slow@rank=1,phase=data,seconds=0.3"])
def test_a_slow_rank_is_named_by_status_and_the_collector(
    tmp_path: Path, tones_corpus: Path, fault: str
) -> None:
    """Two real processes, rank 1's forward passes slowed threefold, or its data by 0.3 s a step (a slow
    disk: its peer waits in the all-reduce, so both steps take as long), by fault injection."""
    run_dir = tmp_path / "run"
    command = engine_command(
        run_dir,
        tones_corpus,
        2,
        "train.max_steps=12",
        "train.global_batch_size=8",
        "logging.steps=2",
        "eval.steps=100",
        "eval.at_start=false",
        "train.max_micro_batch_size=4",
    )
    done = subprocess.run(command, env=python_env(ASRLAUNCH_FAULT=fault), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (slow,) = stragglers(RunHistory.read(RunDir(run_dir)).current)
    assert slow.rank == 1 and slow.ratio >= 2.0
    shown = subprocess.run(
        [PYTHON, "-m", "asrlaunch", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        env=python_env(),
    )
    assert json.loads(shown.stdout)["slow"][0].startswith("rank 1 ")
    collected = subprocess.run(
        [PYTHON, "-m", "asrlaunch", "collect", str(run_dir)], capture_output=True, text=True, env=python_env()
    )
    assert collected.returncode == 0 and "slow: rank 1 " in collected.stdout, collected.stderr
