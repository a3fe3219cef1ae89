"""What `status`, `--wait` and `--resume` make of the scheduler's answers over time: a job that may have
ended, one that never starts, restart counts asked job by job, a silent controller."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from asrlaunch.job.scheduler import job_restarts

from .test_status_parsers import SCONTROL, FakeRun


@pytest.mark.parametrize("state", ["PREEMPTED", "UNKNOWN", "RUNNING"])
def test_resume_of_a_run_whose_job_may_have_ended_needs_force(
    state: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A job preempted without a requeue (PreemptMode=CANCEL) stays PREEMPTED, as one on its way back to the
    queue does for a moment: --resume is refused with what to check, and --force then goes ahead. A live
    job is refused even then."""
    from asrlaunch.cli import submit as submit_cli
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.job.scheduler import JobState
    from asrlaunch.launcher.status import RunStatus

    run_dir = RunDir(tmp_path)
    job = JobState(state, source="sacct")
    monkeypatch.setattr(submit_cli, "collect_status", lambda _: [RunStatus(run_dir, job_id="45", job=job)])
    with pytest.raises(submit_cli.SubmitError, match="squeue -j 45" if job.may_have_ended else "scancel 45"):
        submit_cli.ensure_stopped(run_dir)
    if job.may_have_ended:
        submit_cli.ensure_stopped(run_dir, force=True)
    else:
        with pytest.raises(submit_cli.SubmitError):
            submit_cli.ensure_stopped(run_dir, force=True)


def test_wait_ends_on_a_job_whose_dependency_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A training job whose preparation failed stays PENDING (DependencyNeverSatisfied) for good: `--wait`
    ends on it, while one that waits for resources is waited for."""
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.job.scheduler import JobState
    from asrlaunch.launcher import status as status_module

    reasons = iter(["Resources", "Dependency", "DependencyNeverSatisfied"])

    def collect(paths: list[Path]) -> list[status_module.RunStatus]:
        return [status_module.RunStatus(RunDir(paths[0]), job=JobState("PENDING", reason=next(reasons)))]

    monkeypatch.setattr(status_module, "collect_status", collect)
    monkeypatch.setattr(status_module.time, "sleep", lambda _s: None)
    (waited,) = status_module.wait_for([RunDir(tmp_path)])
    assert waited.never_starts and waited.job.state == "PENDING"


def test_restarts_are_asked_of_the_wanted_jobs_not_the_whole_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` and `--wait` poll: each asks scontrol about its own jobs (an array's id covers its elements);
    only for many jobs at once is the controller's whole table read, in one call."""
    fake = FakeRun(SCONTROL)
    monkeypatch.setattr(subprocess, "run", fake)
    assert job_restarts(["42", "50_0", "50_1"]) == {"42": 3, "50_0": 1, "50": 0, "44": 1}
    assert fake.commands == [["scontrol", "show", "job", "42"], ["scontrol", "show", "job", "50"]]
    fake.commands.clear()
    job_restarts([str(job) for job in range(100, 120)])
    assert fake.commands == [["scontrol", "show", "job"]]


def test_a_silent_controller_costs_one_timeout_per_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """status and --wait ask scontrol about each wanted job: a silent one is waited for once, not per job."""
    from asrlaunch.job import scheduler

    now = [0.0]
    calls: list[list[str]] = []

    def silent(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(command))
        now[0] += kwargs["timeout"]
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", silent)
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: now[0])
    assert job_restarts(["42", "43", "44", "45"]) == {}
    assert len(calls) == 1
