"""Failures beyond preemption, without a scheduler: the failover decision, fault injection, an out-of-memory
step split in two, a full disk during a checkpoint, SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.recipe import ClusterSection
from asrlaunch.core.records import is_start
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine import checkpoint
from asrlaunch.engine.faults import FaultSpecError, parse_fault, parse_faults
from asrlaunch.job.failover import decide
from asrlaunch.job.task import SlurmTask

from .conftest import engine_command, notable, python_env
from .test_resume import sample_ids, step_losses


def meta(attempt: int, step: int, **event: object) -> dict:
    return {"kind": "meta", "step": step, "epoch": 0.0, "rank": 0, "attempt": attempt, "time": 0.0, **event}


def at_step(step: int, *records: dict) -> RunHistory:
    """The history of these records, its current attempt having trained to `step`."""
    attempt = records[-1]["attempt"]
    trained = {"kind": "train", "step": step, "epoch": 0.0, "rank": 0, "attempt": attempt, "time": 1.0}
    return RunHistory.from_records([*records, trained])


def budget(max_failures: int, restarts: int = 0) -> ClusterSection:
    return ClusterSection(max_failures=max_failures, max_restarts_in_job=restarts)


def test_failover_requeues_a_failure_once_per_budget_and_only_with_progress() -> None:
    start = [meta(0, 0)]
    assert decide(at_step(7, *start), 0, False, budget(2)).record is None  # the step ended well
    handled = at_step(7, *start, meta(0, 7, event="preemption"))
    assert decide(handled, 1, False, budget(2)).record is None  # the ranks checkpointed and logged it
    assert (
        decide(at_step(7, *start, meta(0, 7, event="error", retry=False)), 1, False, budget(2)).record is None
    )
    assert decide(at_step(7, *start), 137, False, budget(2), state="CANCELLED").record is None  # the user's
    assert decide(at_step(7, *start), 137, True, budget(2)).record is None  # finished: nothing to retry
    crashed = at_step(7, *start, meta(0, 7, event="crash", error="RuntimeError: peer gone", retry=True))
    first = decide(crashed, 137, False, budget(2))
    assert first.requeue and first.record is not None
    assert first.record["failures"] == 1 and first.record["errors"] == ["rank 0: RuntimeError: peer gone"]
    history = [*start, meta(0, 7, event="failure", requeued=True), meta(1, 5)]
    again = decide(at_step(12, *history), 137, False, budget(2))
    assert again.requeue  # progress since: 7 -> 12
    stuck = decide(at_step(7, *history), 137, False, budget(2))
    assert not stuck.requeue and "twice in a row at step 7" in stuck.record["error"]  # type: ignore[index]
    spent = decide(at_step(12, *history), 137, False, budget(1))
    assert not spent.requeue and "cluster.max_failures=1" in spent.record["error"]  # type: ignore[index]


def test_out_of_memory_splits_at_one_step_are_progress_until_the_micro_batch_is_one() -> None:
    """With several ranks a split ends the job step (no agreement mid-step) and the next start halves the
    micro-batch: a second split at the same step is not a fault that repeats; an out-of-memory error at
    micro-batch 1 (which logs no split) is."""
    split = {"event": "oom_split", "error": "CUDA out of memory"}
    first = [meta(0, 0), meta(0, 5, **split, plan={"micro_batch": 8})]
    assert decide(at_step(5, *first), 1, False, budget(2, restarts=3)).action == "restart"
    restarted = [*first, meta(0, 5, event="failure", action="restart"), meta(1, 3)]
    again = [*restarted, meta(1, 5, **split, plan={"micro_batch": 4})]
    assert decide(at_step(5, *again), 1, False, budget(2, restarts=3), restarts_in_job=1).action == "restart"
    at_one = decide(at_step(5, *restarted), 1, False, budget(2, restarts=3), restarts_in_job=1)
    assert at_one.action == "none" and "twice in a row at step 5" in at_one.record["error"]  # type: ignore[index]


def test_a_failure_restarts_in_the_allocation_first_then_requeues() -> None:
    """Restarts inside the job come before requeues, per job; a node SLURM set down sends the job back to the
    queue at once (a restart would run on it again); a hang the supervisor ended is a failure like a crash."""
    hung = at_step(9, meta(0, 0), meta(0, 9, event="hang", hung_rank=1, error="rank 1 made no progress"))
    assert decide(hung, 137, False, budget(2, restarts=2), restarts_in_job=0).action == "restart"
    assert decide(hung, 137, False, budget(2, restarts=2), restarts_in_job=1).action == "restart"
    assert decide(hung, 137, False, budget(2, restarts=2), restarts_in_job=2).action == "requeue"
    down = decide(hung, 137, False, budget(2, restarts=2), restarts_in_job=0, bad_nodes=["node2"])
    assert down.action == "requeue"
    # Too close to the time limit for a restarted step to start and still get its stop signal (60 s before,
    # up to 90 s earlier): requeued, for its time (no node left out); with no requeue left, a last restart.
    late = decide(hung, 137, False, budget(2, restarts=2), time_left=250.0)
    assert late.action == "requeue" and late.record is not None and late.record["late"]
    last = decide(hung, 137, False, budget(0, restarts=2), time_left=250.0)
    assert last.action == "restart" and last.record is not None and last.record["late"]
    assert decide(hung, 137, False, budget(2, restarts=2), time_left=600.0).action == "restart"
    restarted = [meta(0, 0), meta(0, 9, event="failure", action="restart"), meta(1, 5)]
    assert (
        decide(at_step(12, *restarted), 137, False, budget(0, restarts=1), restarts_in_job=1).action == "none"
    )
    assert decide(at_step(12, *restarted), 137, False, budget(1, restarts=1), restarts_in_job=1).requeue


def test_a_step_that_logged_nothing_is_judged_as_itself_and_budgets_are_the_jobs() -> None:
    """A step whose ranks died before writing a word is a failure of its own (a new attempt), whatever the
    attempt before it did; the failure budget counts this job's requeues (a --resume gets a new one); a
    requeue that cluster.max_requeues does not allow is not asked for."""
    job = SlurmTask(job_id="42", restart_count=1)
    preempted = at_step(7, meta(0, 0), meta(0, 7, event="preemption"))  # records at time 0.0 and 1.0
    assert decide(preempted, 137, False, budget(2), task=job).record is None  # the old view: handled
    silent = decide(preempted, 137, False, budget(2), step_start=100.0, task=job)
    assert silent.requeue and silent.record is not None and silent.record["failures"] == 1
    assert silent.attempt is not None and silent.attempt.number == preempted.current.number + 1  # type: ignore[union-attr]
    assert silent.attempt.last_step == 7 and not silent.attempt.events
    # Rank 1's node runs 15 s behind the batch script's: its first record seems older than the step.
    ranks = [{**meta(0, 0), "time": 101.0}, {**meta(0, 0), "rank": 1, "time": 86.0}]
    skewed = RunHistory.from_records([*ranks, {**meta(0, 7, event="preemption"), "time": 130.0}])
    assert decide(skewed, 137, False, budget(2), step_start=100.0, task=job).record is None  # handled
    failed = at_step(7, meta(0, 0), meta(0, 7, event="failure", action="requeue", job_id="42"))
    again = decide(failed, 137, False, budget(2), step_start=100.0, task=job)
    assert again.action == "none" and "twice in a row at step 7" in again.record["error"]  # type: ignore[index]
    other_job = [meta(0, 0), meta(0, 7, event="failure", action="requeue", job_id="41"), meta(1, 5)]
    assert decide(at_step(12, *other_job), 137, False, budget(1), task=job).requeue
    this_job = [meta(0, 0), meta(0, 7, event="failure", action="requeue", job_id="42"), meta(1, 5)]
    spent = decide(at_step(12, *this_job), 137, False, budget(1), task=job)
    assert spent.action == "none" and "cluster.max_failures=1" in spent.record["error"]  # type: ignore[index]
    limit = ClusterSection(max_failures=2, max_restarts_in_job=0, max_requeues=1)
    at_limit = decide(at_step(12, *other_job), 137, False, limit, task=job)
    assert at_limit.action == "none" and "cluster.max_requeues=1" in at_limit.record["error"]  # type: ignore[index]


def test_fault_specs_parse_or_say_the_accepted_form() -> None:
    crash = parse_fault("crash@step=30,rank=1")
    assert (crash.kind, crash.step, crash.rank, crash.micro, crash.phase) == ("crash", 30, 1, None, "step")
    assert parse_fault("oom@step=5,micro=8").due(5, 0, 8) and not parse_fault("oom@step=5,micro=8").due(
        5, 0, 4
    )
    stall = parse_fault("stall@step=10,rank=0,phase=eval,seconds=60")
    assert stall.due(10, 0, 0, "eval") and not stall.due(10, 0, 0, "step") and stall.seconds == 60
    slow, crashed = parse_faults("slow@rank=1,factor=2; crash@step=3,phase=checkpoint")
    assert (slow.kind, slow.rank, slow.factor, slow.step) == ("slow", 1, 2.0, 0)
    assert (crashed.kind, crashed.phase) == ("crash", "checkpoint")
    assert parse_fault("freeze@step=10,rank=1,phase=checkpoint").due(10, 1, 0, "checkpoint")
    for bad in ("boom@step=1", "crash@rank=1", "crash@step=x", "oom@step=1,color=2", "crash@step=1,phase=x"):
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


def ctc_infinite(run_dir: Path) -> list[int]:
    return [r["ctc_infinite"] for r in read_run_logs(run_dir) if r["kind"] == "train" and r["rank"] == 0]


@pytest.mark.slow
def test_out_of_memory_splits_the_micro_batch_and_keeps_the_step(tmp_path: Path, tones_corpus: Path) -> None:
    """The error comes at the step's last micro-batch, after three have accumulated their gradients: the
    redone step drops those and counts its too-short transcripts once (this conv stack makes some)."""
    split, small = tmp_path / "split", tmp_path / "small"
    short = tuple(
        f"model.config.conv_{key}=[{value}]"
        for key, value in (("dim", "32, 32, 32, 32"), ("kernel", "10, 8, 8, 8"), ("stride", "5, 8, 8, 8"))
    )
    done = train(split, tones_corpus, "checkpoint.save_steps=3", *short, fault="oom@step=2,micro=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert train(small, tones_corpus, "train.max_micro_batch_size=4", *short).returncode == 0
    events = [r for r in read_run_logs(split) if r.get("event") == "oom_split"]
    assert [(e["step"], e["plan"]["micro_batch"], e["plan"]["grad_accum"]) for e in events] == [(2, 4, 8)]
    assert "out of memory" in events[0]["error"]
    assert sample_ids(split) == sample_ids(small)  # the same samples at every step
    reference = step_losses(small)
    for step, loss in step_losses(split).items():
        assert loss == pytest.approx(reference[step], rel=1e-5)
    assert ctc_infinite(split)[-1] > 0 and ctc_infinite(split) == ctc_infinite(small)
    # A new start (here: a longer run resumed) begins with the smaller micro-batch.
    RunDir(split).finished_marker.unlink()
    resumed = train(split, tones_corpus, "checkpoint.save_steps=3", "train.max_steps=8", *short)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts = [r for r in read_run_logs(split) if is_start(r)]
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
    assert [r["event"] for r in notable(records)] == ["checkpoint_error", "error"]
    assert max(r["step"] for r in records if r["kind"] == "train") == 6
    moved = tmp_path / "moved"  # the user frees space: here, the run moves to a larger disk
    shutil.copytree(run_dir, moved)
    again = train_on(moved)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "(step 3," in again.stdout
    assert RunDir(moved).is_finished()


def terminate_after_windows(command: list[str], run_dir: Path, windows: int) -> str:
    """Run the engine, SIGTERM it once rank 0 has logged `windows` train records; its stderr, once it has
    stopped with ExitCode.STOPPED."""
    process = subprocess.Popen(
        command,
        env=python_env(OMP_NUM_THREADS="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = RunDir(run_dir).rank_log(0)
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count('"train"') >= windows):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr[-2000:]
    return stderr


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
    terminate_after_windows(command, run_dir, 3)
    (event,) = notable(read_run_logs(run_dir))
    assert event["event"] == "terminated" and event["requeued"] is False
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [event["step"]]
    last_trained = max(r["step"] for r in read_run_logs(run_dir) if r["kind"] == "train")
    assert event["step"] == last_trained  # at the step boundary: no step lost, none half done


@pytest.mark.slow
def test_a_stop_whose_checkpoint_cannot_be_written_says_so(
    small_disk: Path, tmp_path: Path, tones_corpus: Path
) -> None:
    """`checkpoint.on_error: continue` and a full disk when SIGTERM comes: the stop is logged and reported
    without the checkpoint it could not write (the run would resume from an older one), not as saved."""
    (small_disk / "filler").write_bytes(bytes(3 * 2**20))  # 1 MiB left: less than a checkpoint
    run_dir = small_disk / "run"
    settings = ("checkpoint.on_error=continue", "train.global_batch_size=8", "train.max_steps=400")
    command = engine_command(
        run_dir, tones_corpus, 1, "eval.at_start=false", "logging.steps=1", "eval.steps=1000", *settings
    )
    command.append(f"data.cache_dir={tmp_path / 'cache'}")
    stderr = terminate_after_windows(command, run_dir, 2)
    assert "its checkpoint could not be written" in stderr and "checkpoint saved" not in stderr
    (*_, event) = notable(read_run_logs(run_dir))
    assert event["event"] == "terminated" and "could not be written" in event["error"]
    assert event["checkpointed"] is False
    from asrlaunch.core.history import RunHistory
    from asrlaunch.launcher.status import stopped_line

    assert "without its checkpoint" in stopped_line(RunHistory.read(RunDir(run_dir)), RunDir(run_dir))
    assert checkpoint.list_checkpoints(run_dir / "checkpoints") == []


def test_the_first_training_window_opens_at_the_start_record(tmp_path: Path, tones_corpus: Path) -> None:
    """Setting up (here a 3 s stall once the model is built and resumed) is start-up in goodput's account: the
    first window's samples/s, which goodput turns back into training seconds, must not hold it too."""
    run = tmp_path / "run"
    done = train(
        run, tones_corpus, "train.max_steps=2", "logging.steps=2", fault="stall@step=0,phase=start,seconds=3"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_run_logs(run)
    start = next(r for r in records if is_start(r) and r["rank"] == 0)
    first = next(r for r in records if r["kind"] == "train" and r["rank"] == 0)
    opened = first["time"] - first["step"] * start["plan"]["global_batch"] / first["samples_per_s"]
    assert opened >= start["time"] - 0.1


def test_a_shard_rank_0_cannot_see_fails_the_checkpoint_instead_of_leaving_the_manifest(
    tmp_path: Path,
) -> None:
    """Each rank names what it wrote; a file another node wrote that rank 0 cannot find (a shared file system
    that lost it, or has not shown it yet) is an error, not a manifest that silently leaves it unchecked."""
    folder = tmp_path / "partial"
    (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(64))
    (folder / "pytorch_model_fsdp_0" / "shard.pt").write_bytes(bytes(8))
    written = checkpoint.flush_written(folder)
    assert written == ["model.safetensors", "pytorch_model_fsdp_0/shard.pt"]
    manifest = checkpoint.write_manifest(folder, 5, {}, written)
    assert sorted(manifest["files"]) == written
    with pytest.raises(OSError, match=r"not found by rank 0: .*random_states_1\.pkl"):
        checkpoint.write_manifest(folder, 5, {}, [*written, "random_states_1.pkl"])


def test_a_checkpoint_that_fails_on_rank_0_for_another_reason_is_a_crash_on_every_rank(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Not a full disk (here: the step's folder name taken by a file): every rank ends as a crash, which
    failover may retry; before, rank 0 crashed and rank 1 raised the final checkpoint error, so the attempt
    looked final and was never retried."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint.step_dir(run_dir / "checkpoints", 2).write_text("in the way")
    settings = (
        "train.global_batch_size=8",
        "checkpoint.save_steps=2",
        "train.max_steps=4",
        "eval.at_start=false",
    )
    done = subprocess.run(
        engine_command(run_dir, tones_corpus, 2, *settings), env=python_env(), capture_output=True, text=True
    )
    assert done.returncode != 0
    ended = [r for r in notable(read_run_logs(run_dir)) if r["event"] in ("crash", "error")]
    assert sorted((r["rank"], r["event"], r["retry"]) for r in ended) == [
        (0, "crash", True),
        (1, "crash", True),
    ]
