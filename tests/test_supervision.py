"""The supervisor's judgement, failover's triage and the run's goodput, on pasted output and made-up
heartbeats (no cluster); a straggler named by status and the collector after a real two-process run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from asrlaunch.core.goodput import goodput, stop_history, stragglers
from asrlaunch.core.history import RunHistory
from asrlaunch.core.recipe import SUPERVISOR_HEADROOM_S, load_recipe
from asrlaunch.core.rundir import RunDir
from asrlaunch.job.heartbeat import Beat
from asrlaunch.job.supervisor import SILENT_S, Watch, budget, judge, rank_states
from asrlaunch.job.triage import describe_exit, node_states, srun_failures, usable_nodes

from .conftest import PYTHON, RECIPES, engine_command, python_env

RECIPE = load_recipe(RECIPES / "smoke.yaml", ["data.dir=x", "train.hang_timeout_s=30"])
NOW = 1000.0


def beat(
    rank: int,
    phase: str = "step",
    step: int = 20,
    since: float = 990.0,
    seen: float = 999.0,
    waiting: bool = False,
    max_step_s: float = 0.5,
) -> Beat:
    return Beat(
        rank, 100 + rank, "vm", f"node{rank + 1}", 500.0, 0, phase, step, since, waiting, max_step_s, seen
    )


def test_a_stopped_rank_is_blamed_not_the_peer_that_waits_for_it() -> None:
    beats = {
        0: beat(0, since=950.0, seen=999.0, waiting=True),  # alive, in the all-reduce, no progress for 50 s
        1: beat(1, since=955.0, seen=955.0),  # its process stopped: no heartbeat for 45 s
    }
    hang = judge(rank_states(RECIPE, beats, 2, started=400.0, now=NOW))
    assert hang is not None and hang.rank.rank == 1 and hang.suspects == [1]
    assert hang.rank.silent_s > SILENT_S and hang.rank.budget_s == 30


def test_a_rank_stopped_in_a_long_phase_is_blamed_for_its_peers_wait() -> None:
    """Rank 1 stopped inside a checkpoint write (whose budget is long); rank 0 waits for it in a step."""
    beats = {0: beat(0, since=960.0, waiting=True), 1: beat(1, phase="checkpoint", since=960.0, seen=960.0)}
    hang = judge(rank_states(RECIPE, beats, 2, started=400.0, now=NOW))
    assert hang is not None and hang.rank.rank == 1 and hang.suspects == [1]
    assert hang.rank.phase == "checkpoint"


def test_a_stopped_rank_is_blamed_before_the_barrier_its_peer_waits_at_times_out() -> None:
    """Both ranks in a checkpoint (900 s budget): rank 0 at the barrier, rank 1 stopped mid-write. Silence
    ends at `train.hang_timeout_s` in any phase: else the barrier's timeout fires first, on rank 0."""
    beats = {
        0: beat(0, phase="checkpoint", since=960.0, waiting=True),
        1: beat(1, phase="checkpoint", since=965.0, seen=965.0),
    }
    hang = judge(rank_states(RECIPE, beats, 2, started=400.0, now=NOW))
    assert hang is not None and hang.rank.rank == 1 and hang.rank.budget_s == 30
    alive = {0: beats[0], 1: beat(1, phase="checkpoint", since=965.0)}  # writing, its heartbeat fresh
    assert judge(rank_states(RECIPE, alive, 2, started=400.0, now=NOW)) is None


def test_every_budget_ends_before_a_waiting_peers_collective_would_time_out() -> None:
    recipe = load_recipe(
        RECIPES / "smoke.yaml", ["data.dir=x", "train.hang_timeout_s=30", "train.collective_timeout_s=120"]
    )
    deadline = recipe.train.collective_deadline_s
    assert deadline == 120 - SUPERVISOR_HEADROOM_S
    slow = {0: beat(0, since=NOW - deadline - 1, max_step_s=60.0), 1: beat(1, max_step_s=60.0)}
    hang = judge(rank_states(recipe, slow, 2, started=400.0, now=NOW))  # not ten times the longest step
    assert hang is not None and hang.rank.rank == 0 and hang.rank.budget_s == deadline
    single = rank_states(recipe, {0: slow[0]}, 1, started=400.0, now=NOW)  # one rank: no collective
    assert judge(single) is None and single[0].budget_s == 600
    stuck = {0: beat(0, phase="eval", since=NOW - deadline - 1), 1: beat(1, phase="eval", waiting=True)}
    hang = judge(rank_states(recipe, stuck, 2, started=400.0, now=NOW))
    assert hang is not None and hang.rank.rank == 0 and hang.rank.budget_s == deadline
    alone = {0: stuck[0], 1: beat(1, phase="eval")}  # no peer waits: the evaluation's own 600 s
    assert judge(rank_states(recipe, alone, 2, started=400.0, now=NOW)) is None
    earlier = load_recipe(RECIPES / "smoke.yaml", ["data.dir=x", "train.collective_timeout_s=300"])
    assert earlier.train.hang_timeout_s == 300  # a run's recipe from before the default of 600 s still loads
    assert budget(earlier, "step", None) == 300 and earlier.train.collective_deadline_s == 285


def test_no_hang_within_the_budgets_and_each_phase_has_its_own() -> None:
    beats = {0: beat(0, since=975.0), 1: beat(1, phase="eval", since=500.0)}
    states = rank_states(RECIPE, beats, 2, started=400.0, now=NOW)
    assert judge(states) is None  # 25 s into a step, 500 s into an evaluation: both within their budgets
    assert budget(RECIPE, "step", beat(0, max_step_s=12.0)) == 120  # ten times the longest step, when more
    assert budget(RECIPE, "checkpoint", None) == RECIPE.checkpoint.hang_timeout_s
    assert budget(RECIPE, "startup", None) == RECIPE.train.startup_timeout_s


def test_a_rank_that_never_beat_is_starting_up_since_the_step_began() -> None:
    stale = Beat(
        0, 7, "vm", "node1", 5.0, 0, "step", 3, 10.0, False, 0.1, 10.0
    )  # a process of an earlier step
    states = rank_states(RECIPE, {0: stale}, 1, started=NOW - 100.0, now=NOW)
    assert states[0].phase == "startup" and judge(states) is None
    late = rank_states(RECIPE, {}, 1, started=NOW - RECIPE.train.startup_timeout_s - 1, now=NOW)
    hang = judge(late)
    assert hang is not None and hang.rank.phase == "startup"


def test_a_node_whose_clock_is_behind_or_a_beat_unread_for_a_moment_is_not_a_hang() -> None:
    """Rank 1's node is 40 s behind (its `time`, `since`, `started` say so); rank 1's file cannot be read at
    one poll. Both ranks step every second for 10 minutes: no hang. Then rank 1 stops: blamed, on this
    node's clock (silent 30 s, not 70)."""
    watch, started, skew = Watch(), NOW, 40.0

    def beats_at(now: float, step: int, stopped_at: float | None = None) -> dict[int, Beat]:
        beats = {}
        for rank, behind in ((0, 0.0), (1, skew)):
            written = now if stopped_at is None or rank == 0 else stopped_at
            step_of = step if stopped_at is None or rank == 0 else int(stopped_at - started)
            beats[rank] = Beat(
                rank,
                100 + rank,
                "vm",
                f"node{rank + 1}",
                started + 1.0 - behind,
                0,
                "step",
                step_of,
                written - 0.5 - behind,
                rank == 0,
                1.0,
                written - behind,  # rank 0 in the all-reduce
            )
        return beats

    for tick in range(2, 600, 2):
        now = started + tick
        read = beats_at(now, tick)
        if tick == 598:  # rank 0 waits: as `startup` since the step, rank 1 would be over 585 s
            del read[1]  # a rename in flight: not readable this once
        assert judge(rank_states(RECIPE, watch.update(read, now), 2, started, now)) is None, tick
    stopped, hang = started + 600.0, None
    for tick in range(600, 700, 2):
        now = started + tick
        hang = judge(rank_states(RECIPE, watch.update(beats_at(now, tick, stopped), now), 2, started, now))
        if hang is not None:
            break
    assert hang is not None and hang.rank.rank == 1 and not hang.alike
    assert SILENT_S < hang.rank.silent_s <= RECIPE.train.hang_timeout_s + 2 * 2.0


def test_a_beat_of_an_earlier_step_never_counts_as_this_ones() -> None:
    """The previous step's rank 0 is dead: its beat never changes, so it is not taken for this step's."""
    watch, old = Watch(), Beat(0, 7, "vm", "node1", 5.0, 0, "step", 3, 10.0, False, 0.1, 10.0)
    for now in (NOW, NOW + 2.0, NOW + 4.0):
        states = rank_states(RECIPE, watch.update({0: old}, now), 1, NOW - 1.0, now)
        assert states[0].phase == "startup" and judge(states) is None


def test_ranks_that_hang_alike_name_no_single_rank_and_leave_no_node_out(tmp_path: Path) -> None:
    """A kernel hung on one GPU stops every rank at the same point: the heartbeats cannot tell which."""
    from asrlaunch.core.history import Attempt
    from asrlaunch.job.task import SlurmTask
    from asrlaunch.job.triage import first_failure

    beats = {rank: beat(rank, since=950.0, waiting=True) for rank in (0, 1)}
    hang = judge(rank_states(RECIPE, beats, 2, started=400.0, now=NOW))
    assert hang is not None and hang.alike and hang.suspects == [0, 1]
    one = {0: beats[0], 1: beat(1, since=950.0)}  # rank 1 not in the all-reduce: it is the one
    single = judge(rank_states(RECIPE, one, 2, started=400.0, now=NOW))
    assert single is not None and single.rank.rank == 1 and not single.alike
    event = {"kind": "meta", "event": "hang", "rank": 0, "step": 20, "hung_rank": 0, "suspects": [0, 1]}
    for alike, node in ((True, None), (False, "node1")):
        attempt = Attempt(1, events=[{**event, "alike": alike, "node": "node1", "phase": "step"}])
        first = first_failure(RunDir(tmp_path), attempt, tmp_path, SlurmTask())
        assert first is not None and first.node == node


# srun's report of a 2-node step whose rank 1 was killed (SLURM 22.05, pasted), after an earlier step's lines.
SRUN = """\
asrlaunch: step starts (restarts in this allocation: 0)
srun: error: node1: task 0: Exited with exit code 3
asrlaunch: step starts (restarts in this allocation: 1)
srun: error: node2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=1.0
slurmstepd-node1: error: *** STEP 1.0 ON node1 CANCELLED AT 2026-11-30T01:32:40 ***
srun: error: node1: task 0: Terminated
srun: Force Terminated StepId=1.0
"""


def test_the_heartbeat_file_says_a_new_attempt_or_phase_at_once(tmp_path: Path) -> None:
    """A start and a few fast steps fit between two of the thread's beats: a rank stopped there must not be
    judged from a beat that still says "startup" with no attempt (once: the wrong phase and attempt)."""
    from asrlaunch.job.heartbeat import Heartbeat

    run_dir = RunDir(tmp_path / "run")

    def read() -> Beat:
        written = Beat.read(run_dir.heartbeat(0))
        assert written is not None
        return written

    heartbeat = Heartbeat(run_dir, 0, NOW, interval_s=3600).start()  # the thread itself never beats again
    try:
        assert (read().phase, read().attempt) == ("startup", None)
        heartbeat.begin_attempt(2)
        assert read().attempt == 2
        heartbeat.step_done(1, 180.0)  # compiling: the first step of an attempt sets no budget
        assert (read().phase, read().step) == ("step", 1)
        heartbeat.step_done(2, 1.5)
        assert heartbeat.beat().max_step_s == 1.5 and budget(RECIPE, "step", heartbeat.beat()) == 30
        heartbeat.enter("eval", 5)
        assert (read().phase, read().step) == ("eval", 5)
    finally:
        heartbeat.stop()
    assert read().phase == "done"


def test_a_rank_stuck_after_the_final_save_is_still_a_hang(tmp_path: Path) -> None:
    """The run is finished (its marker written), but a rank hangs closing its trackers: watched on."""
    import os
    import time

    import yaml

    from asrlaunch.core.logs import read_run_logs
    from asrlaunch.job.supervisor import supervise
    from asrlaunch.job.task import SlurmTask

    run = RunDir(tmp_path / "run")
    run.recipe.parent.mkdir(parents=True)
    recipe = load_recipe(RECIPES / "smoke.yaml", ["data.dir=x", "checkpoint.hang_timeout_s=10"])
    run.recipe.write_text(yaml.safe_dump(recipe.to_dict()))
    run.finished_marker.parent.mkdir(parents=True)
    run.mark_finished(40)
    now = time.time()
    stuck = Beat(0, 2**22 + 1, "vm", "node1", now - 100, 0, "final", 40, now - 60, False, 0.5, now)
    run.heartbeat(0).parent.mkdir(parents=True)
    run.heartbeat(0).write_text(json.dumps(dataclasses.asdict(stuck)))
    hang = supervise(run, SlurmTask(), poll_s=0.01, step_start=now - 100)
    assert hang is not None and hang.rank.phase == "final" and hang.rank.budget_s == 10
    assert [r["hung_rank"] for r in read_run_logs(run) if r.get("event") == "hang"] == [0]
    assert os.path.exists(run.stacks)


def test_srun_says_which_task_ended_first_and_how() -> None:
    assert srun_failures(SRUN) == [("node2", 1, "signal KILL"), ("node1", 0, "signal TERM")]
    assert describe_exit("Exited with exit code 137") == "exit code 137"
    assert srun_failures("srun: error: gpu[03]: tasks 4-7: Segmentation fault\n") == [
        ("gpu[03]", 4, "signal SEGV")
    ]


def test_node_states_from_scontrol() -> None:
    shown = (
        "NodeName=node1 Arch=x86_64 CoresPerSocket=1\n   State=IDLE ThreadsPerCore=1\n\n"
        "NodeName=node2 Arch=x86_64 CoresPerSocket=1\n   State=DOWN+DRAIN ThreadsPerCore=1\n"
    )
    assert node_states(shown) == {"node1": "IDLE", "node2": "DOWN+DRAIN"}


# `sinfo -h -N -p debug -o '%N|%t'`, SLURM 22.05's compact states (pasted; a node listed once per partition).
SINFO_NODES = "node1|idle\nnode2|mix\nnode3|alloc\nnode4|drng\nnode5|idle*\nnode6|drain\nnode7|down*\n"
SINFO_NODES += "node8|comp\nnode9|fail\nnode10|resv\n"


def test_a_requeue_counts_only_the_nodes_a_job_could_start_on() -> None:
    """Draining (`drng`) and not responding (`idle*`) nodes are no room for a job that leaves one out."""
    assert usable_nodes(SINFO_NODES) == {"node1", "node2", "node3", "node8", "node10"}


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
