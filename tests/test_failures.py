"""Failures beyond preemption, without a scheduler: the failover decision, fault injection, an out-of-memory
step split in two, a full disk during a checkpoint, SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch import checkpoint
from asrlaunch.failover import decide
from asrlaunch.faults import Fault, FaultSpecError, parse_fault
from asrlaunch.logs import read_run_logs
from asrlaunch.rundir import RunDir

from .conftest import engine_command, python_env
from .test_resume import sample_ids, step_losses


def meta(attempt: int, step: int, **event: object) -> dict:
    return {"kind": "meta", "step": step, "epoch": 0.0, "rank": 0, "attempt": attempt, "time": 0.0, **event}


def test_failover_requeues_a_failure_once_per_budget_and_only_with_progress() -> None:
    start = [meta(0, 0)]
    assert decide(start, 0, False, 2, 7).record is None  # the step ended well
    assert decide([*start, meta(0, 7, event="preemption")], 1, False, 2, 7).record is None  # handled
    assert decide([*start, meta(0, 7, event="error", retry=False)], 1, False, 2, 7).record is None
    assert decide(start, 137, False, 2, 7, state="CANCELLED").record is None  # the user's decision
    assert decide(start, 137, True, 2, 7).record is None  # finished: nothing to retry
    first = decide(
        [*start, meta(0, 7, event="crash", error="RuntimeError: peer gone", retry=True)], 137, False, 2, 7
    )
    assert first.requeue and first.record is not None
    assert first.record["failures"] == 1 and first.record["errors"] == ["rank 0: RuntimeError: peer gone"]
    history = [*start, meta(0, 7, event="failure", requeued=True), meta(1, 5)]
    again = decide(history, 137, False, 2, 12)
    assert again.requeue  # progress since: 7 -> 12
    stuck = decide(history, 137, False, 2, 7)
    assert not stuck.requeue and "twice in a row at step 7" in stuck.record["error"]  # type: ignore[index]
    spent = decide(history, 137, False, 1, 12)
    assert not spent.requeue and "cluster.max_failures=1" in spent.record["error"]  # type: ignore[index]


def test_fault_specs_parse_or_say_the_accepted_form() -> None:
    assert parse_fault("crash@step=30,rank=1") == Fault("crash", 30, 1, None)
    assert parse_fault("oom@step=5,micro=8").due(5, 0, 8) and not parse_fault("oom@step=5,micro=8").due(
        5, 0, 4
    )
    for bad in ("boom@step=1", "crash@rank=1", "crash@step=x", "oom@step=1,color=2"):
        with pytest.raises(FaultSpecError, match="expected <kind>@step="):
            parse_fault(bad)


COMMON = ("train.max_steps=6", "logging.steps=1", "logging.sample_ids=true", "eval.steps=100")


def train(run_dir: Path, corpus: Path, *overrides: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    extra = {"ASRLAUNCH_FAULT": fault} if fault else {}
    return subprocess.run(
        engine_command(run_dir, corpus, 1, "eval.at_start=false", *COMMON, *overrides),
        env=python_env(OMP_NUM_THREADS="2", **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_out_of_memory_splits_the_micro_batch_and_keeps_the_step(tmp_path: Path, tones_corpus: Path) -> None:
    split, small = tmp_path / "split", tmp_path / "small"
    done = train(split, tones_corpus, "checkpoint.save_steps=3", fault="oom@step=2,micro=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert train(small, tones_corpus, "train.max_micro_batch_size=4").returncode == 0
    events = [r for r in read_run_logs(split) if r.get("event") == "oom_split"]
    assert [(e["step"], e["plan"]["micro_batch"], e["plan"]["grad_accum"]) for e in events] == [(2, 4, 8)]
    assert "out of memory" in events[0]["error"]
    assert sample_ids(split) == sample_ids(small)  # the same samples at every step
    reference = step_losses(small)
    for step, loss in step_losses(split).items():
        assert loss == pytest.approx(reference[step], rel=1e-5)
    # A new start (here: a longer run resumed) begins with the smaller micro-batch.
    RunDir(split).finished_marker.unlink()
    resumed = train(split, tones_corpus, "checkpoint.save_steps=3", "train.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts = [r for r in read_run_logs(split) if r["kind"] == "meta" and not r.get("event")]
    assert [s["plan"]["micro_batch"] for s in starts] == [8, 4] and starts[-1]["resumed_from"] == 3


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: room for one checkpoint of the smoke model (2.5 MiB), not for two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    small_disk: Path, tmp_path: Path, tones_corpus: Path
) -> None:
    run_dir = small_disk / "run"
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # the corpus cache lives off the small disk

    def train_on(folder: Path) -> subprocess.CompletedProcess[str]:
        settings = ("train.global_batch_size=8", "checkpoint.save_steps=3", "train.max_steps=10", cache)
        return subprocess.run(
            engine_command(folder, tones_corpus, 1, "eval.at_start=false", "logging.steps=1", *settings),
            env=python_env(OMP_NUM_THREADS="2"),
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = train_on(run_dir)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "no space left on device writing the step-6 checkpoint" in errors[0]
    assert str(run_dir / "checkpoints") in errors[0] and "MiB" in errors[0]
    checkpoints = run_dir / "checkpoints"
    assert [step for step, _ in checkpoint.list_checkpoints(checkpoints)] == [3]
    checkpoint.verify(checkpoint.step_dir(checkpoints, 3))  # intact
    assert not list(checkpoints.glob(".step-*"))  # no partial folder left
    records = read_run_logs(run_dir)  # every line whole
    assert [r["event"] for r in records if r.get("event")] == ["checkpoint_error", "error"]
    assert max(r["step"] for r in records if r["kind"] == "train") == 6
    moved = tmp_path / "moved"  # the user frees space: here, the run moves to a larger disk
    shutil.copytree(run_dir, moved)
    again = train_on(moved)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "(step 3," in again.stdout
    assert RunDir(moved).is_finished()


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_does_not_requeue(
    tmp_path: Path, tones_corpus: Path
) -> None:
    run_dir = tmp_path / "run"
    command = engine_command(
        run_dir,
        tones_corpus,
        1,
        "eval.at_start=false",
        "logging.steps=1",
        "eval.steps=1000",
        "train.global_batch_size=8",
        "train.max_steps=400",
    )
    process = subprocess.Popen(
        command,
        env=python_env(OMP_NUM_THREADS="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = RunDir(run_dir).rank_log(0)
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count('"train"') >= 3):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr[-2000:]
    (event,) = [r for r in read_run_logs(run_dir) if r.get("event")]
    assert event["event"] == "terminated" and event["requeued"] is False
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [event["step"]]
    last_trained = max(r["step"] for r in read_run_logs(run_dir) if r["kind"] == "train")
    assert event["step"] == last_trained  # at the step boundary: no step lost, none half done
