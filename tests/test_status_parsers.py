"""The scheduler's text, parsed: squeue, sacct, scontrol and time-left output pasted from SLURM 22.05, and
the stop classification and requeue with a fake `subprocess.run`. No cluster needed."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from asrlaunch import signals
from asrlaunch.scheduler import (
    TERMINAL,
    parse_restarts,
    parse_sacct,
    parse_scontrol_jobs,
    parse_squeue,
    parse_time_left,
)

SQUEUE = """\
42|RUNNING|node[1-2]|1:23|None
50_0|RUNNING|node3|0:05|None
50_1|PENDING||0:00|Resources
50_2|PENDING||0:00|Priority
77|PENDING||0:00|PartitionConfig
81|COMPLETING|node1|2:00|None
"""

SACCT = """\
42|COMPLETED|node[1-2]|00:03:10
43|CANCELLED by 0|node1|00:00:12
44|NODE_FAIL|node2|00:01:00
45|PREEMPTED|node1|00:00:30
46|TIMEOUT|node3|00:20:07
50_0|COMPLETED|node3|00:02:00
50_[1-2]|PENDING|None assigned|00:00:00
"""

SCONTROL = """\
JobId=42 JobName=smoke
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   Priority=4294901758 Nice=0 Account=(null) QOS=(null)
   JobState=RUNNING Reason=None Dependency=(null)
   Requeue=1 Restarts=3 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:01:23 TimeLimit=00:20:00 TimeMin=N/A
   NodeList=node[1-2]

JobId=51 ArrayJobId=50 ArrayTaskId=0 JobName=sweep
   JobState=RUNNING Reason=None Dependency=(null)
   Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=0:0

JobId=50 ArrayJobId=50 ArrayTaskId=1-2 JobName=sweep
   JobState=PENDING Reason=Resources Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0

JobId=44 JobName=lost
   JobState=PENDING Reason=BeginTime Dependency=(null)
   Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=0:0
"""


def test_squeue_lines_with_arrays_and_pending_reasons() -> None:
    states = parse_squeue(SQUEUE)
    assert states["42"].state == "RUNNING" and states["42"].nodes == "node[1-2]" and states["42"].reason == ""
    assert states["50_1"].state == "PENDING" and states["50_1"].reason == "Resources"
    assert states["77"].reason == "PartitionConfig" and not states["77"].ended
    assert states["81"].state == "COMPLETING" and not states["81"].ended
    assert parse_squeue("42|RUNNING|node1|0:01\n")["42"].reason == ""  # the older four-field format
    assert parse_squeue("") == {} and parse_squeue("garbage\n") == {}


def test_sacct_lines_cancelled_by_a_user_node_fail_and_array_elements() -> None:
    states = parse_sacct(SACCT)
    assert states["43"].state == "CANCELLED" and states["43"].ended
    assert states["44"].state == "NODE_FAIL" and states["44"].ended
    assert states["45"].state == "PREEMPTED" and not states["45"].ended  # on its way back to the queue
    assert states["46"].state == "TIMEOUT" and states["50_0"].elapsed == "00:02:00"
    assert states["50_[1-2]"].state == "PENDING"
    assert {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"} <= TERMINAL


def test_scontrol_blocks_give_restarts_per_job_and_array_element() -> None:
    assert parse_restarts(SCONTROL) == {"42": 3, "50_0": 1, "50": 0, "44": 1}
    jobs = parse_scontrol_jobs(SCONTROL)
    assert jobs["44"]["JobState"] == "PENDING" and jobs["44"]["Reason"] == "BeginTime"  # a requeued job waits
    assert jobs["42"]["NodeList"] == "node[1-2]"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1-02:03:04", 93784), ("2:03:04", 7384), ("3:04", 184), ("0:05", 5), ("UNLIMITED", None), ("", None)],
)
def test_time_left(text: str, seconds: float | None) -> None:
    assert parse_time_left(text) == seconds


class FakeRun:
    """Stands in for subprocess.run: records the commands, answers with canned stdout."""

    def __init__(self, stdout: str = "", returncode: int = 0) -> None:
        self.stdout, self.returncode = stdout, returncode
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(command))
        return subprocess.CompletedProcess(command, self.returncode, self.stdout, "")


@pytest.mark.parametrize(
    ("time_left", "expected"),
    [("1:30\n", "timeout"), ("2:00\n", "timeout"), ("2:01\n", "preemption"), ("15:00\n", "preemption")],
)
def test_stop_near_the_time_limit_is_a_timeout(
    monkeypatch: pytest.MonkeyPatch, time_left: str, expected: str
) -> None:
    fake = FakeRun(time_left)
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert signals.classify_stop(signal_delay_s=90) == expected
    assert fake.commands == [["squeue", "-h", "-j", "42", "-o", "%L"]]


def test_stop_outside_slurm_is_a_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert signals.classify_stop(60) == "signal"


def test_requeue_targets_the_array_element_and_respects_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun()
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setenv("SLURM_JOB_ID", "51")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "50")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert signals.requeue_job(restarts_so_far=1, max_requeues=2)
    assert fake.commands == [["scontrol", "requeue", "50_0"]]
    assert not signals.requeue_job(restarts_so_far=2, max_requeues=2)  # budget spent: no command at all
    assert len(fake.commands) == 1
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert signals.requeue_job(0, 5) and fake.commands[-1] == ["scontrol", "requeue", "51"]
    fake.returncode = 1
    assert not signals.requeue_job(0, 5)  # scontrol refused (e.g. nodes not up yet)


@pytest.mark.parametrize(
    ("preempt_time", "expected"), [("2026-11-28T21:54:32", "preemption"), ("None", "terminated")]
)
def test_sigterm_is_a_preemption_only_when_slurm_marked_the_job_preempted(
    monkeypatch: pytest.MonkeyPatch, preempt_time: str, expected: str
) -> None:
    import signal as signals_module

    fake = FakeRun(f"JobId=42 JobName=smoke\n   JobState=RUNNING PreemptTime={preempt_time}\n")
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert signals.stop_reason(signals_module.SIGTERM, 90) == expected
    assert fake.commands == [["scontrol", "show", "job", "42"]]
