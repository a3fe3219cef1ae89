"""The run's history, status and the logging window, on pasted log lines: attempts, stops and their kinds,
resume points, failures, out-of-memory caps, the next attempt, the last error, progress."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import read_records
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine.metrics import TrainMetrics, window_loss
from asrlaunch.launcher.status import RunStatus, format_table, progress_from_logs

# Pasted logs of 2 ranks: a crash of rank 1 and a failure (requeued), an out-of-memory split, a preemption.
PASTED = Path(__file__).parent / "fixtures" / "history"


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.logs.mkdir(parents=True)
    for rank in (0, 1):
        run.rank_log(rank).write_text((PASTED / f"rank{rank}.jsonl").read_text())
    return run


def test_the_history_of_a_run_with_a_failure_a_split_and_a_preemption(run_dir: RunDir) -> None:
    history = RunHistory.read(run_dir)
    assert [a.number for a in history.attempts] == [0, 1, 2]
    assert history.starts == [(0, 0), (1, 5), (2, 12)] and history.restarts == [5, 12]
    assert history.stops == ["failure", "preemption"]  # one stop per attempt, though both ranks logged it
    assert [f["errors"] for f in history.failures] == [["rank 1: RuntimeError: peer gone"]]
    assert history.oom_micro_cap() == 2
    assert history.next_attempt(restart_count=0) == 3 and history.next_attempt(restart_count=7) == 7
    first = history.attempts[0]
    assert first.world_size == 2 and first.last_step == 8 and first.plan["total_steps"] == 40
    assert [e["event"] for e in first.events] == ["checkpoint", "crash", "failure"]  # in time order
    assert not first.final_error and history.current is history.attempts[2]
    assert history.last_error == ""  # the last start came after the last error
    assert (history.progress.step, history.progress.loss, history.progress.wer) == (14, 2.2, 0.9)


def test_the_same_history_from_records_read_whole(run_dir: RunDir) -> None:
    records = [r for path in run_dir.rank_logs().values() for r in read_records(path)]
    whole, read = RunHistory.from_records(records), RunHistory.read(run_dir)
    assert whole.starts == read.starts and whole.stops == read.stops and whole.progress == read.progress


def meta(step: int, time: float, **fields: object) -> dict:
    """A meta record of rank 0 in attempt 0 (8 steps an epoch)."""
    return {"kind": "meta", "step": step, "epoch": step / 8, "rank": 0, "attempt": 0, "time": time, **fields}


def write_rank0_log(run: RunDir, *records: dict) -> None:
    run.logs.mkdir(parents=True, exist_ok=True)
    run.rank_log(0).write_text("".join(json.dumps(record) + "\n" for record in records))


def test_an_error_no_retry_can_fix_is_the_runs_last_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    limit = "requeue limit reached (cluster.max_requeues=1): the checkpoint of step 12 is kept"
    write_rank0_log(
        run, meta(0, 1.0, world_size=1), meta(12, 2.0, event="timeout", requeued=False, error=limit)
    )
    history = RunHistory.read(run)
    assert history.last_error == limit and history.stops == ["timeout"]


def test_a_stop_before_the_latest_submission_is_not_the_runs_state(tmp_path: Path) -> None:
    """Stopped by the user (a checkpoint, `terminated`, not requeued), then resubmitted with --resume: a job
    that failed before its ranks wrote a word shows FAILED, not the old STOPPED with its advice."""
    from asrlaunch.job.scheduler import JobState
    from asrlaunch.launcher.status import state_text

    run = RunDir(tmp_path)
    plan = {"total_steps": 40}
    write_rank0_log(
        run, meta(0, 1.0, world_size=1, plan=plan), meta(12, 2.0, event="terminated", requeued=False)
    )
    for submitted, state in ((1.5, "STOPPED"), (3.0, "FAILED"), (None, "STOPPED")):
        status = RunStatus(run, job=JobState("FAILED"))
        progress_from_logs(status, submitted)
        assert state_text(status) == state, submitted
    assert "submit --resume" in stopped_line_of(run, None) and stopped_line_of(run, 3.0) == ""


def stopped_line_of(run: RunDir, submitted: float | None) -> str:
    from asrlaunch.launcher.status import stopped_line

    return stopped_line(RunHistory.read(run), run, submitted)


def test_status_shows_the_history(run_dir: RunDir) -> None:
    status = RunStatus(run_dir)
    progress_from_logs(status)
    assert (status.step, status.total_steps, status.epoch, status.loss, status.wer) == (
        14,
        40,
        1.75,
        2.2,
        0.9,
    )
    assert status.starts == [(0, 0), (1, 5), (2, 12)] and status.stops == ["failure", "preemption"]
    row = format_table([status]).splitlines()[1]
    assert " 5,12 " in row and "failure x1, preemption x1" in row and "14/40" in row


def test_the_logging_window_filters_non_finite_losses_as_the_trainer_did() -> None:
    """transformers 4.15 (`logging_nan_inf_filter`): a NaN step adds the mean of the window so far."""
    assert window_loss([1.0, 3.0]) == 2.0
    assert window_loss([1.0, 3.0, math.nan, 4.0]) == pytest.approx((1 + 3 + 4 / 3 + 4) / 4)
    assert window_loss([math.inf, 2.0]) == 1.0  # a first step that is not finite adds 0
    metrics = TrainMetrics(global_batch=8)
    for loss, seconds, compute in ((1.0, 0.5, 0.2), (math.nan, 0.7, 0.3), (2.0, 0.6, 0.25)):
        metrics.step_done(loss, seconds, compute)
    figures = metrics.flush()
    assert figures["loss"] == pytest.approx(round((1.0 + 0.5 + 2.0) / 3, 6))
    assert figures["step_s"] == 0.6 and figures["compute_s"] == 0.25 and figures["samples_per_s"] > 0
    assert metrics.flush()["loss"] != metrics.flush()["loss"]  # an empty window: NaN (no steps)


def test_a_resumed_window_times_its_steps_apart_from_its_compute() -> None:
    """After a resume the window holds the checkpoint's losses; its step and compute times are two lists."""
    metrics = TrainMetrics(global_batch=8)
    metrics.load_state_dict({"loss_window": [1.0, 2.0]})
    for _ in range(2):
        metrics.step_done(3.0, 1.0, 0.1)
    figures = metrics.flush()
    assert (figures["step_s"], figures["compute_s"]) == (1.0, 0.1)
    assert figures["loss"] == pytest.approx(9.0 / 4)


def test_an_out_of_memory_cap_holds_until_a_resume_changes_the_micro_batch_limit() -> None:
    start = meta(0, 0.0, plan={}, recipe={"train": {"max_micro_batch_size": 32}})
    split = meta(3, 0.5, event="oom_split", plan={"micro_batch": 8})
    history = RunHistory.from_records([start, split])
    assert history.oom_micro_cap(32) == 8 and history.oom_micro_cap() == 8
    assert history.oom_micro_cap(64) is None  # resumed onto bigger GPUs with a raised limit


def test_progress_after_a_resume_is_the_resumed_step_not_the_failed_attempts() -> None:
    """Attempt 0 logged to step 590 (WER at 580) and failed; attempt 1 resumed from 500: until it logs, status
    shows step 500 with no loss, samples/s or WER of steps it trains again; a WER at or before 500 stays."""

    def record(kind: str, step: int, attempt: int, **fields: object) -> dict:
        base = {"kind": kind, "step": step, "epoch": step / 100, "rank": 0, "attempt": attempt, "time": 0.0}
        return {**base, **fields}

    failed = [
        record("meta", 0, 0, resumed_from=None),
        record("eval", 500, 0, wer=0.5),
        record("eval", 580, 0, wer=0.4),
        record("train", 590, 0, loss=1.5, samples_per_s=100.0),
        record("meta", 590, 0, event="failure"),
    ]
    resumed = RunHistory.from_records([*failed, record("meta", 500, 1, resumed_from=500)]).progress
    assert (resumed.step, resumed.epoch, resumed.loss, resumed.samples_per_s, resumed.wer) == (
        500,
        5.0,
        None,
        None,
        None,
    )
    earlier = [*failed[:2], failed[3], record("meta", 550, 1, resumed_from=550)]
    assert RunHistory.from_records(earlier).progress.wer == 0.5
    start = record("meta", 500, 1, resumed_from=500)
    assert RunHistory.from_records([*failed, start, record("train", 510, 1)]).progress.step == 510


def test_a_window_resumed_on_another_world_size_keeps_the_old_worlds_mean() -> None:
    """Two ranks stopped mid-window; rank 0 held twice the loss of a partial batch's last micro-batch (its
    share weighted up), rank 1 none: one process resumes with their mean, not rank 0's view."""
    from asrlaunch.engine.metrics import resumed_window

    windows = [{"loss_window": [2.0, 4.0]}, {"loss_window": [1.0, 0.0]}]
    assert resumed_window(windows, 1, 2) == windows[1]  # the same world: each rank its own
    assert resumed_window(windows, 0, 1) == {"loss_window": [1.5, 2.0]}
    assert resumed_window(windows, 3, 4) == {"loss_window": [1.5, 2.0]}
    assert resumed_window([{"loss_window": [2.0]}], 1, 2) == {"loss_window": [2.0]}  # an older checkpoint's


def test_the_eta_counts_the_evaluations_left(tmp_path: Path) -> None:
    """timit32's shape: 2900 steps, evaluations every 100 (and at the end): at step 2750 at 32 samples/s, 150
    steps (150 s) and 2 evaluations (2800, 2900) of 87 s each are left; before any evaluation, steps only."""
    status = RunStatus(RunDir(tmp_path), step=2750, total_steps=2900, samples_per_s=32.0, eval_every=100)
    assert status.eta_s == pytest.approx(150.0)
    status.eval_seconds = 87.0
    assert status.eta_s == pytest.approx(150.0 + 2 * 87.0)
    status.total_steps = 2950  # not a multiple: its own final evaluation too
    assert status.eta_s == pytest.approx(200.0 + 3 * 87.0)
    records = [
        {
            "kind": "meta",
            "step": 0,
            "epoch": 0.0,
            "rank": 0,
            "attempt": 0,
            "time": 0.0,
            "recipe": {"eval": {"steps": 100}},
        },
        {
            "kind": "eval",
            "step": 100,
            "epoch": 0.7,
            "rank": 0,
            "attempt": 0,
            "time": 1.0,
            "eval_seconds": 87.0,
        },
    ]
    progress = RunHistory.from_records(records).progress
    assert (progress.eval_every, progress.eval_seconds) == (100, 87.0)
