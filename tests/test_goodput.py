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


def history_of(*records: dict) -> RunHistory:
    base = {"epoch": 0.0}
    return RunHistory.from_records([{**base, **r} for r in records])


def test_goodput_splits_the_lost_time_by_cause() -> None:
    plan = {"global_batch": 8, "steps_per_epoch": 10}
    history = history_of(
        {
            "kind": "meta",
            "step": 0,
            "rank": 0,
            "attempt": 0,
            "time": 110.0,
            "process_started": 100.0,
            "plan": plan,
            "resumed_from": None,
        },
        {"kind": "train", "step": 10, "rank": 0, "attempt": 0, "time": 130.0, "samples_per_s": 4.0},
        {
            "kind": "meta",
            "step": 10,
            "rank": 0,
            "attempt": 0,
            "time": 131.0,
            "event": "checkpoint",
            "seconds": 1.0,
        },
        {"kind": "train", "step": 20, "rank": 0, "attempt": 0, "time": 151.0, "samples_per_s": 4.0},
        {
            "kind": "meta",
            "step": 20,
            "rank": 0,
            "attempt": 0,
            "time": 190.0,
            "event": "hang",
            "stale_s": 35.0,
        },
        {
            "kind": "meta",
            "step": 20,
            "rank": 0,
            "attempt": 0,
            "time": 195.0,
            "event": "failure",
            "action": "restart",
        },
        {
            "kind": "meta",
            "step": 10,
            "rank": 0,
            "attempt": 1,
            "time": 205.0,
            "process_started": 200.0,
            "plan": plan,
            "resumed_from": 10,
        },
        {"kind": "train", "step": 30, "rank": 0, "attempt": 1, "time": 245.0, "samples_per_s": 4.0},
        {"kind": "eval", "step": 30, "rank": 0, "attempt": 1, "time": 250.0, "eval_seconds": 5.0},
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


def test_an_attempt_that_hung_while_starting_counts_its_allocated_time() -> None:
    """Preempted, requeued, then 600 s hung in start-up (no start record: only the hang and the failure),
    restarted in the allocation: those 600 s were allocated and lost to the hang, not a requeue wait."""
    plan = {"global_batch": 8, "steps_per_epoch": 10}

    def start(attempt: int, at: float, resumed: int | None) -> dict:
        return {
            "kind": "meta",
            "step": resumed or 0,
            "rank": 0,
            "attempt": attempt,
            "time": at + 5.0,
            "process_started": at,
            "plan": plan,
            "resumed_from": resumed,
        }

    def event(attempt: int, at: float, **fields: object) -> dict:
        return {"kind": "meta", "step": 10, "rank": 0, "attempt": attempt, "time": at, **fields}

    history = history_of(
        start(0, 100.0, None),
        {"kind": "train", "step": 10, "rank": 0, "attempt": 0, "time": 130.0, "samples_per_s": 4.0},
        event(0, 131.0, event="preemption"),
        event(1, 1000.0, event="hang", stale_s=600.0),
        event(1, 1005.0, event="failure", action="restart"),
        start(2, 1010.0, 10),
        {"kind": "train", "step": 20, "rank": 0, "attempt": 2, "time": 1035.0, "samples_per_s": 4.0},
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
    plan = {"global_batch": 8, "steps_per_epoch": 10}

    def attempt(number: int, at: float, resumed: int, reached: int) -> list[dict]:
        start = {
            "kind": "meta",
            "step": resumed,
            "rank": 0,
            "attempt": number,
            "time": at,
            "process_started": at,
            "plan": plan,
            "resumed_from": resumed or None,
        }
        train = {
            "kind": "train",
            "step": reached,
            "rank": 0,
            "attempt": number,
            "time": at + 10.0,
            "samples_per_s": 8.0 * (reached - resumed) / 10.0,
        }
        stop = {
            "kind": "meta",
            "step": reached,
            "rank": 0,
            "attempt": number,
            "time": at + 10.0,
            "event": "preemption",
        }
        return [start, train, stop]

    history = history_of(*attempt(0, 0.0, 0, 20), *attempt(1, 100.0, 20, 30), *attempt(2, 200.0, 10, 40))
    result = goodput(history)
    assert result.productive_s == pytest.approx(5.0 + 0.0 + 10.0)  # 0-10 of the first, 10-40 of the last
    assert result.lost_s["replayed"] == pytest.approx(5.0 + 10.0)


def test_an_attempt_that_died_while_starting_counts_from_its_process_start() -> None:
    """Requeued, then 1500 s preparing a corpus that ends in an error, before any start record: allocated."""
    plan = {"global_batch": 8, "steps_per_epoch": 10}
    history = history_of(
        {
            "kind": "meta",
            "step": 0,
            "rank": 0,
            "attempt": 0,
            "time": 105.0,
            "process_started": 100.0,
            "plan": plan,
            "resumed_from": None,
        },
        {"kind": "train", "step": 10, "rank": 0, "attempt": 0, "time": 130.0, "samples_per_s": 4.0},
        {"kind": "meta", "step": 10, "rank": 0, "attempt": 0, "time": 131.0, "event": "preemption"},
        {
            "kind": "meta",
            "step": 0,
            "rank": 0,
            "attempt": 1,
            "time": 2000.0,
            "event": "error",
            "error": "DataError: ...",
            "retry": False,
            "process_started": 500.0,
        },
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
