"""The supervisor's judgement and failover's triage, on pasted output and made-up heartbeats (no cluster);
goodput and stragglers are test_goodput.py's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from asrlaunch.core.recipe import SUPERVISOR_HEADROOM_S, load_recipe
from asrlaunch.core.rundir import RunDir
from asrlaunch.job.heartbeat import Beat
from asrlaunch.job.supervisor import SILENT_S, Watch, budget, judge, rank_states
from asrlaunch.job.triage import describe_exit, node_states, srun_failures, unusable, usable_nodes

from .conftest import RECIPES

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
    assert "== rank 0: phase final, step 40" in (run.stacks / "attempt0-step40.txt").read_text()


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
    assert [unusable(state) for state in ("IDLE", "DOWN+DRAIN", "IDLE+NOT_RESPONDING", "MIXED")] == [
        False,
        True,
        True,
        False,
    ]


# `sinfo -h -N -p debug -o '%N|%t'`, SLURM 22.05's compact states (pasted; a node listed once per partition).
SINFO_NODES = "node1|idle\nnode2|mix\nnode3|alloc\nnode4|drng\nnode5|idle*\nnode6|drain\nnode7|down*\n"
SINFO_NODES += "node8|comp\nnode9|fail\nnode10|resv\n"


def test_a_requeue_counts_only_the_nodes_a_job_could_start_on() -> None:
    """Draining (`drng`) and not responding (`idle*`) nodes are no room for a job that leaves one out."""
    assert usable_nodes(SINFO_NODES) == {"node1", "node2", "node3", "node8", "node10"}


# A task whose import of the engine hangs (a cold file system), as its process runs it.
SLOW_IMPORT = """
import importlib.abc, sys, time
class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "asrlaunch.engine.train":
            print("stalled", flush=True)
            time.sleep(120)
        return None
sys.meta_path.insert(0, Stall())
from asrlaunch.job.entry import TrainJob
TrainJob()(sys.argv[1])
"""


def test_a_rank_hung_in_its_imports_answers_for_its_stacks_and_lives(tmp_path: Path) -> None:
    """The supervisor asks a whole step for stacks with SIGQUIT. A rank still importing torch, with no beat
    yet, must write its stacks, not die of the signal's default (and dump a core)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from asrlaunch.job.supervisor import RankState, dump_stacks
    from asrlaunch.job.task import SlurmTask

    run_dir = RunDir(tmp_path / "run")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    rank = subprocess.Popen(
        [sys.executable, "-c", SLOW_IMPORT, str(run_dir.path)], env=env, stdout=subprocess.PIPE, text=True
    )

    @dataclasses.dataclass(frozen=True)
    class ElsewhereTask(SlurmTask):  # its ranks on another node: only scancel's signal reaches them
        def running_steps(self, tries: int = 4, pause_s: float = 5.0) -> list[str]:
            return ["0"]

        def cancel_step(self, step: str, signal_name: str = "KILL") -> bool:
            os.kill(rank.pid, getattr(signal, f"SIG{signal_name}"))
            return True

    try:
        assert rank.stdout is not None and rank.stdout.readline().strip() == "stalled"
        starting = RankState(1, "startup", 0, 700.0, 700.0, False, 600.0, None)
        stacks = dump_stacks(run_dir, [starting], ElsewhereTask(job_id="7"), "attempt0-step0.txt").read_text()
        assert "== rank 1" in stacks and "faulthandler of" in stacks and "in find_spec" in stacks, stacks
        assert rank.poll() is None, "the rank died of SIGQUIT"
        # A stop signal in the imports is taken by our handler already (the trainer acts on it at its first
        # step boundary), not by the default action or submitit's (which ignores TERM, requeues on USR2).
        for stop in (signal.SIGTERM, signal.SIGUSR2):
            rank.send_signal(stop)
        time.sleep(0.5)
        assert rank.poll() is None, "a stop signal killed the rank in its imports"
    finally:
        rank.kill()
        rank.wait()


def test_the_supervisor_watches_on_through_stop_signals_and_ends_on_usr1(tmp_path: Path) -> None:
    """`scancel --full`, `B:` signals and preemption signal every process of the batch step, the supervisor
    too: it watches on through the checkpoint they cause; the batch script's teardown stops it with USR1."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from .conftest import python_env

    run = RunDir(tmp_path / "run")
    run.recipe.parent.mkdir(parents=True)
    run.recipe.write_text(yaml.safe_dump(load_recipe(RECIPES / "smoke.yaml", ["data.dir=x"]).to_dict()))
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "asrlaunch", "supervise", "--poll", "0.1", str(run.path)], env=python_env()
    )
    try:

        def mask(name: str) -> int:
            status = Path(f"/proc/{supervisor.pid}/status").read_text()
            return int(status.split(f"\n{name}:\t")[1].split()[0], 16)

        deadline = time.monotonic() + 60
        while not mask("SigCgt") & 1 << (signal.SIGUSR1 - 1):  # its handlers are in place
            assert supervisor.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for stop in (signal.SIGTERM, signal.SIGUSR2):
            supervisor.send_signal(stop)
        time.sleep(1.0)
        assert supervisor.poll() is None  # still watching
        supervisor.send_signal(signal.SIGUSR1)
        assert supervisor.wait(timeout=30) == 0
    finally:
        supervisor.kill()
        supervisor.wait()
