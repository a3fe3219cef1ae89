"""The scheduler's text, parsed: squeue, sacct, scontrol and time-left output pasted from SLURM 22.05, and
what a SLURM task asks the scheduler (stop classification, requeue, the requeue budget, node exclusion) with a
fake `subprocess.run`. No cluster needed."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from asrlaunch.core.recipe import ClusterSection
from asrlaunch.job.scheduler import (
    TERMINAL,
    parse_restarts,
    parse_sacct,
    parse_scontrol_jobs,
    parse_squeue,
    parse_time_left,
)
from asrlaunch.job.task import SlurmTask

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
    # delay 90 s; SLURM may signal up to 60 s early, and the stop is judged a step later: 90 + 60 + 30 = 3:00
    [
        ("1:30\n", "timeout"),
        ("2:30\n", "timeout"),
        ("3:00\n", "timeout"),
        ("3:01\n", "preemption"),
        ("15:00\n", "preemption"),
    ],
)
def test_stop_near_the_time_limit_is_a_timeout(
    monkeypatch: pytest.MonkeyPatch, time_left: str, expected: str
) -> None:
    fake = FakeRun(time_left)
    monkeypatch.setattr(subprocess, "run", fake)
    assert SlurmTask(job_id="42").stop_kind(signal.SIGUSR2, signal_delay_s=90) == expected
    assert fake.commands == [["squeue", "-h", "-j", "42", "-o", "%L"]]


def test_stop_outside_slurm_is_a_signal() -> None:
    assert SlurmTask.from_environ({}).stop_kind(signal.SIGUSR2, 60) == "signal"


def test_a_task_reads_its_ids_from_slurms_variables() -> None:
    task = SlurmTask.from_environ(
        {
            "SLURM_JOB_ID": "51",
            "SLURM_ARRAY_JOB_ID": "50",
            "SLURM_ARRAY_TASK_ID": "3",
            "SLURM_RESTART_COUNT": "2",
            "SLURMD_NODENAME": "node2",
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_NTASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_NUM_NODES": "2",
        }
    )
    assert (task.target, task.array_index, task.restart_count, task.node) == ("50_3", 3, 2, "node2")
    assert (task.proc_id, task.ntasks, task.tasks_per_node, task.nodes) == (5, 8, 4, 2)
    placed = task.placement()
    assert (placed["job_id"], placed["slurm_restart_count"], placed["nodes"], placed["node"]) == (
        "51",
        2,
        2,
        "node2",
    )
    assert SlurmTask.from_environ({}).restart_count == 0 and not SlurmTask.from_environ({}).in_slurm


def test_the_requeue_budget_is_one_comparison() -> None:
    """A start may run after `max_requeues` requeues; a stop may ask for a requeue only below it."""
    assert SlurmTask(job_id="1", restart_count=2).within_requeue_budget(2)
    assert not SlurmTask(job_id="1", restart_count=3).within_requeue_budget(2)
    assert SlurmTask(job_id="1", restart_count=1).within_requeue_budget(2, another=True)
    assert not SlurmTask(job_id="1", restart_count=2).within_requeue_budget(2, another=True)


class OneProcess:
    num_processes, is_main_process = 1, True


def test_requeue_targets_the_array_element_and_respects_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from asrlaunch.engine.stopping import StopDecision
    from asrlaunch.job.signals import StopRequest

    fake = FakeRun("15:00\n")  # squeue's time left: far from the time limit, so USR2 means a preemption
    monkeypatch.setattr(subprocess, "run", fake)
    request = StopRequest()
    request.signal = signal.SIGUSR2
    cluster = ClusterSection(max_requeues=2)

    def decide(task: SlurmTask) -> tuple[str, bool]:
        stop = StopDecision(request, OneProcess(), task, cluster)._decide(7, "--resume")
        return str(stop.kind), stop.requeued

    element = SlurmTask(job_id="51", array_job_id="50", array_task_id="0", restart_count=1)
    assert decide(element) == ("preemption", True)
    assert fake.commands[-1] == ["scontrol", "requeue", "50_0"]
    spent = SlurmTask(job_id="51", array_job_id="50", array_task_id="0", restart_count=2)
    count = len(fake.commands)
    assert decide(spent) == ("preemption", False)  # budget spent: no requeue asked for
    assert not any(c[:2] == ["scontrol", "requeue"] for c in fake.commands[count:])
    unsaved = StopDecision(request, OneProcess(), spent, cluster)._decide(7, "--resume", saved=False).error
    assert unsaved is not None and "checkpoint of step 7 could not be written" in unsaved
    assert "is kept" not in unsaved  # its checkpoint was not written: only an older one is
    assert SlurmTask(job_id="51").requeue() and fake.commands[-1] == ["scontrol", "requeue", "51"]
    fake.returncode = 1
    assert not SlurmTask(job_id="51").requeue()  # scontrol refused (e.g. nodes not up yet)


def test_a_requeue_without_a_node_holds_updates_and_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM changes the exclusions of pending jobs only; the nodes excluded before stay excluded."""
    shown = "JobId=42 JobName=smoke\n   JobState=RUNNING ExcNodeList=node3\n"
    fake = FakeRun(shown)
    monkeypatch.setattr(subprocess, "run", fake)
    assert SlurmTask(job_id="42").requeue_without(["node1"]) == (True, True)
    assert fake.commands[1:] == [
        ["scontrol", "requeuehold", "42"],
        ["scontrol", "update", "JobId=42", "ExcNodeList=node1,node3"],
        ["scontrol", "release", "42"],
    ]


def test_a_release_the_controller_does_not_answer_in_time_is_asked_again_then_status_says_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requeuehold ends the batch step (KILL after KillWait, 30 s): update and release get 10 + 8 + 8 s, not a
    minute each, and a job left held says how to free it."""
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.launcher.status import collect_status

    fake = FakeRun("JobId=42 JobName=smoke\n   JobState=RUNNING ExcNodeList=(null)\n")
    limits: list[float] = []
    after_release = (
        "JobState=PENDING Reason=JobHeldUser"  # what the controller did with a release it let time out
    )

    def busy(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        limits.append(kwargs["timeout"])
        if command[:2] == ["scontrol", "release"]:
            fake.stdout = f"JobId=42 JobName=smoke\n   {after_release} ExcNodeList=node1\n"
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return fake(command)

    monkeypatch.setattr(subprocess, "run", busy)
    assert SlurmTask(job_id="42").requeue_without(["node1"]) == (False, True)
    assert sum(limits[2:5]) <= 30 and limits[3:5] == [8, 8]  # after the hold: update, release, release
    after_release = "JobState=PENDING Reason=BeginTime"  # released after all: a requeued job waits
    fake.stdout = "JobId=42 JobName=smoke\n   JobState=RUNNING ExcNodeList=(null)\n"
    assert SlurmTask(job_id="42").requeue_without(["node1"]) == (True, True)
    monkeypatch.setattr(subprocess, "run", FakeRun("42|PENDING||0:00|JobHeldUser\n"))
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.recipe.write_text("run: {name: run}\n")
    run_dir.record_job({"job_id": "42", "executor": "slurm", "submitted": 0.0})
    (status,) = collect_status([run_dir.path])
    assert status.notes[0].startswith("held: it starts only after `scontrol release 42`"), status.notes


@pytest.mark.parametrize(
    ("preempt_time", "expected"), [("2026-11-28T21:54:32", "preemption"), ("None", "terminated")]
)
def test_sigterm_is_a_preemption_only_when_slurm_marked_the_job_preempted(
    monkeypatch: pytest.MonkeyPatch, preempt_time: str, expected: str
) -> None:
    fake = FakeRun(f"JobId=42 JobName=smoke\n   JobState=RUNNING PreemptTime={preempt_time}\n")
    monkeypatch.setattr(subprocess, "run", fake)
    assert SlurmTask(job_id="42").stop_kind(signal.SIGTERM, 90) == expected
    assert fake.commands == [["scontrol", "show", "job", "42"]]


def test_a_preemption_is_told_from_a_users_stop_though_the_controller_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A controller busy preempting many jobs times out once: asked again (briefly: the grace time runs), the
    SIGTERM is still a preemption, which is requeued, not a user's stop."""
    fake = FakeRun("JobId=42 JobName=smoke\n   JobState=RUNNING PreemptTime=2026-11-28T21:54:32\n")
    timeouts: list[float] = []

    def busy_once(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        timeouts.append(kwargs["timeout"])
        if len(timeouts) == 1:
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return fake(command)

    monkeypatch.setattr(subprocess, "run", busy_once)
    monkeypatch.setattr("time.sleep", lambda _s: None)
    assert SlurmTask(job_id="42").stop_kind(signal.SIGTERM, 90) == "preemption"
    assert timeouts == [8.0, 8.0]


def test_a_finished_run_whose_job_the_scheduler_forgot_shows_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """squeue and sacct no longer know job 77 (purged, no accounting): UNKNOWN, unless the run finished."""
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.launcher.status import collect_status

    monkeypatch.setattr(subprocess, "run", FakeRun(""))
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.recipe.write_text("run: {name: run}\n")
    run_dir.record_job({"job_id": "77", "executor": "slurm", "submitted": 0.0})
    assert [s.job.state for s in collect_status([run_dir.path])] == ["UNKNOWN"]
    run_dir.final.mkdir()
    run_dir.mark_finished(260)
    assert [s.job.state for s in collect_status([run_dir.path])] == ["COMPLETED"]


def test_wait_ends_on_a_preemption_that_lasts_not_on_one_passed_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A requeued job passes through PREEMPTED on its way back to PENDING; one preempted without a requeue
    (PreemptMode=CANCEL) stays there: `--wait` ends then, and a run beside it still goes on to its end."""
    from asrlaunch.core.rundir import RunDir
    from asrlaunch.job.scheduler import JobState
    from asrlaunch.launcher import status as status_module

    requeued = ["RUNNING", "PREEMPTED", "PENDING", "RUNNING", "COMPLETED"]
    cancelled = ["RUNNING", *["PREEMPTED"] * 20]
    polls: list[int] = []

    def collect(paths: list[Path]) -> list[status_module.RunStatus]:
        turn = len(polls)
        polls.append(turn)
        states = {paths[0]: requeued[min(turn, len(requeued) - 1)], paths[1]: cancelled[min(turn, 20)]}
        return [status_module.RunStatus(RunDir(p), job=JobState(states[p])) for p in paths]

    monkeypatch.setattr(status_module, "collect_status", collect)
    clock = iter(float(tick) for tick in range(1000))
    monkeypatch.setattr(status_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(status_module.time, "sleep", lambda _s: None)
    ended = status_module.wait_for([RunDir(tmp_path / "a"), RunDir(tmp_path / "b")], unknown_limit_s=5.0)
    assert [s.job.state for s in ended] == ["COMPLETED", "PREEMPTED"]
    assert len(polls) == 8  # the preemption lasted past 5 (monotonic) seconds: the cancelled job's end


def test_a_busy_controller_is_asked_again_and_a_scancel_timeout_does_not_escape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """squeue fails twice (a busy controller) before it lists the step; a scancel that times out is a
    refusal, not an exception that would leave the step running."""
    answers = iter([1, 1, 0])
    fake = FakeRun("42.batch\n42.extern\n42.3\n")

    def flaky(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if command[0] == "scancel":
            raise subprocess.TimeoutExpired(command, 60)
        fake.returncode = next(answers)
        return fake(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", flaky)
    task = SlurmTask(job_id="42")
    assert task.running_steps(pause_s=0.0) == ["3"] and len(fake.commands) == 3
    assert task.cancel_step("3") is False


def test_the_batch_scripts_master_address_is_empty_unless_scontrol_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty ASRLAUNCH_MASTER_ADDR makes each task ask for itself; a guess (the node list itself) would
    send every task of every restart to an address that does not resolve."""
    from asrlaunch.job.task import known_first_node_address

    answers = {
        "hostnames": "gpu01\ngpu02\n",
        "node": "NodeName=gpu01 Arch=x86_64\n   NodeAddr=10.1.0.1 NodeHostName=gpu01\n",
    }

    def scontrol(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 0 if answers[command[2]] else 1, answers[command[2]], "")

    monkeypatch.setattr(subprocess, "run", scontrol)
    assert known_first_node_address("gpu[01-02]") == "10.1.0.1"
    answers["node"] = ""  # the controller did not answer for the node
    assert known_first_node_address("gpu[01-02]") is None
    answers["hostnames"] = ""
    assert known_first_node_address("gpu[01-02]") is None
