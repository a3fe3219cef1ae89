"""Failures beyond preemption on the real local SLURM cluster: a dead rank, a lost node, signals to the whole
job, SIGTERM-only preemption, a repeating fault, an exhausted failure budget. Every run that completes is
bitwise equal to an uninterrupted one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.launcher.status import collect_status
from asrlaunch.results.merge import merge_records

from .conftest import PYTHON, BackgroundRun, notable, python_env
from .slurm_cluster import (
    CLUSTER,
    SLURM_MARKS,
    SUBMIT,
    kill_rank,
    last_train,
    launch,
    preempt_with_a_high_priority_job,
    same_weights,
    scontrol,
    wait_for_step,
    wait_until_done,
)

pytestmark = SLURM_MARKS


# Two nodes x one task, small steps; a checkpoint every 5 steps; a dead peer is noticed within a minute.
SHAPE = [
    "train.global_batch_size=8",
    "train.max_micro_batch_size=4",
    "train.max_steps=40",
    "logging.steps=1",
    "eval.steps=1000",
    "checkpoint.save_steps=5",
    "train.collective_timeout_s=60",
    "train.hang_timeout_s=30",
]
JOB = ["cluster.nodes=2", "cluster.processes_per_node=1", "cluster.max_restarts_in_job=0", *SHAPE]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tones_corpus: Path) -> BackgroundRun:
    """The same run uninterrupted: two gloo processes under torchrun, one thread each, as the job's tasks;
    it trains while the first test's job waits on its requeues."""
    return BackgroundRun(
        tmp_path_factory.mktemp("straight") / "run", tones_corpus, 2, "eval.at_start=false", *SHAPE
    )


def events(run_dir: Path) -> list[str]:
    return [r["event"] for r in notable(read_run_logs(run_dir)) if r["rank"] == 0]


def test_dead_rank_full_job_signal_and_lost_node_each_requeue_and_end_exact(
    tmp_path: Path, tones_corpus: Path, straight: BackgroundRun
) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=survivor", *JOB)
    wait_for_step(run_dir, 0, 8)
    kill_rank(job_id, 1)  # 1. a rank dies: srun ends the step, failover requeues
    wait_for_step(run_dir, 1, last_train(run_dir, 0) + 4)
    # 2. a signal to the whole job, batch shell included: the shell outlives it, the job checkpoints
    subprocess.run(["scancel", "--signal=USR2", "--full", job_id], check=True)
    wait_for_step(run_dir, 2, last_train(run_dir, 1) + 4)
    nodelist = scontrol("show", "job", job_id).split(" NodeList=")[1].split()[0]
    lost = scontrol("show", "hostnames", nodelist).split()[-1]  # rank 1's node
    try:  # 3. a node is lost under the running job: SLURM requeues it (the job is requeueable)
        scontrol("update", f"nodename={lost}", "state=down", "reason=asrlaunch-test")
        states = wait_until_done([run_dir])
    finally:
        subprocess.run(["scontrol", "update", f"nodename={lost}", "state=resume"], capture_output=True)
    assert states[run_dir] == "COMPLETED"
    assert "Restarts=3" in scontrol("show", "job", job_id)
    kinds = events(run_dir)
    assert (
        kinds[0] == "crash" and kinds[1] == "failure" and "preemption" in kinds and kinds[-1] == "terminated"
    )
    assert same_weights(straight.result(), run_dir)
    merged = merge_records(read_run_logs(run_dir))
    assert list(merged.train) == list(range(1, 41)) and len(merged.restarts) == 3  # every step once
    (status,) = collect_status([run_dir])
    assert status.job.restarts == 3 and status.stops == ["failure", "preemption", "terminated"]


def test_without_a_failure_budget_a_dead_rank_ends_the_job_with_the_reason(
    tmp_path: Path, tones_corpus: Path
) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=budget", "cluster.max_failures=0", *JOB)
    wait_for_step(run_dir, 0, 6)
    kill_rank(job_id, 1)
    assert wait_until_done([run_dir])[run_dir] == "FAILED"
    shown = subprocess.run(
        [PYTHON, str(Path(SUBMIT).parent / "status.py"), str(run_dir)], capture_output=True, text=True
    )
    assert "FAILED" in shown.stdout and "failure x1" in shown.stdout
    assert "more than cluster.max_failures=0" in shown.stdout


def test_a_fault_that_repeats_at_the_same_step_is_not_retried_forever(
    tmp_path: Path, tones_corpus: Path
) -> None:
    env = python_env(ASRLAUNCH_FAULT="crash@step=12,rank=1")
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=repeat", *JOB, env=env)
    assert wait_until_done([run_dir])[run_dir] == "FAILED"
    failures = [r for r in read_run_logs(run_dir) if r.get("event") == "failure"]
    assert [f["requeued"] for f in failures] == [True, False]
    assert "twice in a row at step 12" in failures[-1]["error"]
    assert "Restarts=1" in scontrol("show", "job", job_id)


def test_a_step_whose_ranks_die_before_a_word_is_a_failure_restarted_then_stopped(
    tmp_path: Path, tones_corpus: Path
) -> None:
    """Every rank dies as it starts (out of memory loading a checkpoint, a bad GPU): no record of the step
    exists, yet failover judges it as a failure of its own, restarts it in the allocation, and stops the
    second one: it failed twice in a row at step 0."""
    env = python_env(ASRLAUNCH_FAULT="crash@step=0,phase=start")
    job = [*JOB, "cluster.max_restarts_in_job=1"]
    ((_, run_dir),) = launch(tmp_path, tones_corpus, "run.name=silent", *job, env=env)
    assert wait_until_done([run_dir])[run_dir] == "FAILED"
    records = read_run_logs(run_dir)
    assert not [r for r in records if r.get("event") != "failure"]  # the ranks never wrote a word
    failures = [r for r in records if r.get("event") == "failure"]
    assert [(f["attempt"], f["action"]) for f in failures] == [(0, "restart"), (1, "none")]
    assert "twice in a row at step 0" in failures[-1]["error"]
    assert failures[0]["first_exit"] == "signal KILL"


def test_sigterm_checkpoints_a_cancel_stays_and_term_preemption_requeues(
    tmp_path: Path, tones_corpus: Path, straight: BackgroundRun
) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=term", "cluster.partition=low", *JOB)
    wait_for_step(run_dir, 0, 6)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)  # the user's signal: no requeue
    assert wait_until_done([run_dir])[run_dir] == "FAILED"
    assert events(run_dir) == ["terminated"]
    stopped_at = last_train(run_dir, 0)
    status = [PYTHON, "-m", "asrlaunch", "status", str(run_dir)]
    shown = subprocess.run(status, capture_output=True, text=True, env=python_env())
    row, *notes = shown.stdout.splitlines()[1:]
    assert " STOPPED " in row and "failure" not in row  # the user's stop: stopped, not failed
    assert f"stopped at step {stopped_at} (terminated) with its checkpoint" in notes[0]
    assert f"asrlaunch submit --resume {run_dir}" in notes[0]
    resubmitted = subprocess.run(
        [PYTHON, SUBMIT, "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        # Slow steps (sleeps: the same numbers), so the preemption below, a scheduler cycle away, finds the
        # resumed job still training rather than done.
        env=python_env(ASRLAUNCH_FAULT="slow@rank=0,factor=8"),
        cwd=tmp_path,
    )
    assert resubmitted.returncode == 0, resubmitted.stderr
    subprocess.run(["bash", str(CLUSTER), "preempt-mode", "term"], check=True, capture_output=True)
    try:
        wait_for_step(run_dir, 1, stopped_at + 4)
        preempt_with_a_high_priority_job()  # SIGTERM, a grace time, then SLURM requeues
        assert wait_until_done([run_dir])[run_dir] == "COMPLETED"
    finally:
        subprocess.run(["bash", str(CLUSTER), "preempt-mode", "user"], check=True, capture_output=True)
    assert events(run_dir) == ["terminated", "preemption"]  # the second: SLURM marked it preempted
    assert same_weights(straight.result(), run_dir)
    merged = merge_records(read_run_logs(run_dir))
    assert list(merged.train) == list(range(1, 41))
