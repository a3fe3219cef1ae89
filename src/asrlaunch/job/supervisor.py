"""The supervisor: a process beside srun, not a rank, that ends a step whose ranks stopped making progress.

The batch script starts it before srun and stops it after (launcher/submission.py):

    python -m asrlaunch supervise --step-start $asrlaunch_step_start RUN_DIR [RUN_DIR ...] &

(a job array: every element's run directory).

Every few seconds it reads the ranks' heartbeats (heartbeat.py). A rank hangs when its last progress, or the
last sign that its process lives, is older than its phase's budget: `train.startup_timeout_s` until its first
step, `train.hang_timeout_s` for steps (or ten times the longest step it took, when that is more),
`eval.hang_timeout_s` between evaluation batches, `checkpoint.hang_timeout_s` for checkpoint writes and the
final save; shortened where a peer's collective would time out first and take the blame (effective_budget).
Then the supervisor
1. names the rank that hangs: among the ranks without progress, one that is not waiting for the others in a
   collective (a silent one first: its process no longer runs), the one furthest behind;
2. captures the Python stacks of every thread of every rank it can reach into `stacks/`: `py-spy dump` for
   ranks on this host (it reads a stopped process too), and for the others each rank's faulthandler, asked
   with SIGQUIT through `scancel` (and SIGCONT, so a stopped rank wakes to answer);
3. logs a `hang` event (rank, node, phase, step, the stacks' file) and ends the step with SIGKILL
   (`scancel --signal=KILL JOB.STEP`). The failover step after srun decides what comes next (failover.py).
No torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import RankLog
from asrlaunch.core.recipe import Recipe, RecipeError, load_run_recipe
from asrlaunch.core.records import Event
from asrlaunch.core.rundir import RunDir
from asrlaunch.job.heartbeat import Beat, read_beats
from asrlaunch.job.task import SlurmTask

POLL_S = 2.0
SILENT_S = 15.0  # a heartbeat thread writes every 2 s: this much silence means its process does not run


@dataclass(frozen=True)
class RankState:
    rank: int
    phase: str
    step: int
    stale_s: float  # since its last progress
    silent_s: float  # since its process was last seen alive
    waiting: bool
    budget_s: float
    beat: Beat | None

    @property
    def hung(self) -> bool:
        return max(self.stale_s, self.silent_s) > self.budget_s


@dataclass(frozen=True)
class Hang:
    rank: RankState
    suspects: list[int]
    alike: bool = False  # several suspects the heartbeats cannot tell apart: `rank` is only the lowest


def budget(recipe: Recipe, phase: str, beat: Beat | None) -> float:
    """How long a rank in `phase` may go without progress."""
    if phase == "step":
        return max(float(recipe.train.hang_timeout_s), 10.0 * (beat.max_step_s if beat else 0.0))
    if phase == "eval":
        return float(recipe.eval.hang_timeout_s)
    if phase in ("checkpoint", "final"):
        return float(recipe.checkpoint.hang_timeout_s)
    return float(recipe.train.startup_timeout_s)


def effective_budget(
    recipe: Recipe, phase: str, beat: Beat | None, silent: bool, world: int, peer_waits: bool
) -> float:
    """The phase's budget, shortened for a rank whose process is silent (stopped, or holding the GIL: it
    finishes no phase) to `train.hang_timeout_s`, and to the moment before a peer's collective would time
    out (that peer would fail first, blamed, without stacks): while a peer waits in one, and in every
    training step of several ranks (its gradients' all-reduce waits, unmarked, inside backward)."""
    allowed = budget(recipe, phase, beat)
    if silent:
        allowed = min(allowed, float(recipe.train.hang_timeout_s))
    if peer_waits or (world > 1 and phase == "step"):
        allowed = min(allowed, float(recipe.train.collective_deadline_s))
    return allowed


class Watch:
    """The ranks' heartbeats as this process has seen them, on its own clock.

    A rank writes its beat with its node's clock, which may differ from this node's by seconds: a beat whose
    `time` changed while watched (its process lives, so it is this step's: the step before ended) has its
    times moved onto this clock, `time` to when the change was seen here. A rank whose file could not be
    read this once (a rename in flight on a network file system) keeps its last beat."""

    def __init__(self) -> None:
        self.beats: dict[int, Beat] = {}
        self.changed_at: dict[int, float] = {}
        self.live: set[int] = set()

    def update(self, read: dict[int, Beat], now: float) -> dict[int, Beat]:
        for rank, beat in read.items():
            last = self.beats.get(rank)
            if last is None or beat.time != last.time:
                self.changed_at[rank] = now
                if last is not None:
                    self.live.add(rank)
            self.beats[rank] = beat
        return {rank: self._here(rank, beat) for rank, beat in self.beats.items()}

    def _here(self, rank: int, beat: Beat) -> Beat:
        if rank not in self.live:
            return beat
        offset = self.changed_at[rank] - beat.time
        return dataclasses.replace(
            beat, started=beat.started + offset, since=beat.since + offset, time=self.changed_at[rank]
        )


def rank_states(
    recipe: Recipe, beats: dict[int, Beat], world: int, started: float, now: float
) -> list[RankState]:
    """Every rank of this step as the supervisor sees it; a rank whose process has not written a heartbeat
    since this step started is starting up, silent since then."""
    # Heartbeats of processes that started before this step are an earlier step's: those ranks start up.
    current = {rank: beat for rank, beat in beats.items() if beat.started >= started - 5.0}
    states = []
    for rank in range(world):
        beat = current.get(rank)
        if beat is not None and beat.phase == "done":
            continue
        peer_waits = any(other.waiting for peer, other in current.items() if peer != rank)
        phase = beat.phase if beat else "startup"
        since, seen = (beat.since, beat.time) if beat else (started, started)
        silent = beat is not None and now - seen > SILENT_S  # no beat at all: starting up, not stopped
        states.append(
            RankState(
                rank,
                phase,
                beat.step if beat else 0,
                now - since,
                now - seen,
                bool(beat and beat.waiting),
                effective_budget(recipe, phase, beat, silent, world, peer_waits),
                beat,
            )
        )
    return states


def judge(states: Sequence[RankState]) -> Hang | None:
    """When any rank is past its phase's budget, the rank to blame: a silent one (its process stopped), even
    where its own phase would allow more time (a rank stopped inside a checkpoint stalls its peers' steps),
    else a late one that is not waiting for its peers, the one furthest behind (lowest step), the lowest
    rank."""
    hung = [s for s in states if s.hung]
    if not hung:
        return None
    silent = [s for s in states if s.silent_s > SILENT_S]
    suspects = silent or [s for s in hung if not s.waiting] or hung

    def evidence(state: RankState) -> tuple[bool, bool, int]:
        return state.silent_s <= SILENT_S, state.waiting, state.step

    blamed = min(suspects, key=lambda s: (*evidence(s), s.rank))
    alike = sum(evidence(s) == evidence(blamed) for s in suspects) > 1
    return Hang(blamed, [s.rank for s in suspects], alike)


def dump_stacks(run_dir: RunDir, states: Sequence[RankState], task: SlurmTask, name: str) -> Path:
    """The Python stacks of every thread of every rank that can be read, into one file."""
    target = run_dir.stacks / name
    target.parent.mkdir(parents=True, exist_ok=True)
    here, sections = socket.gethostname(), {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    local = [s.beat for s in states if s.beat is not None and s.beat.host == here and Path(spy).exists()]
    # All at once: one at a time, eight ranks of a node could outlast a waiting peer's collective deadline.
    with ThreadPoolExecutor(max_workers=max(1, len(local))) as pool:
        texts = list(pool.map(lambda beat: _py_spy(spy, beat.pid), local))
    for beat, text in zip(local, texts, strict=True):
        if text:
            sections[beat.rank] = f"py-spy dump of pid {beat.pid} on {beat.host}\n{text}"
    missing = [s for s in states if s.rank not in sections]
    if missing and task.in_slurm:  # each rank's faulthandler (registered as its task starts) answers SIGQUIT
        asked = time.time()
        for step in task.running_steps():
            task.cancel_step(step, "QUIT")
            task.cancel_step(step, "CONT")
        settle(run_dir.stacks)
        for state in missing:
            if (answer := _answer(run_dir, state, asked)) is not None:
                path, text = answer
                sections[state.rank] = f"faulthandler of pid {path.stem.split('-pid')[-1]}\n{text}"
    lines = []
    for state in states:
        head = f"== rank {state.rank}: phase {state.phase}, step {state.step}, waiting {state.waiting}, "
        head += f"no progress for {state.stale_s:.0f} s, silent for {state.silent_s:.0f} s"
        lines.append(f"{head}\n{sections.get(state.rank, '(no stacks: not reachable from here)')}\n")
    target.write_text("\n".join(lines))
    return target


def settle(folder: Path, least_s: float = 3.0, still_s: float = 1.0, most_s: float = 15.0) -> None:
    """Wait for the ranks' answers: at least `least_s`, then until no file of `folder` has grown for `still_s`
    (with O_SYNC, many ranks' deep stacks take a while on NFS), at most `most_s`."""
    started = last_change = time.monotonic()
    sizes: dict[str, int] = {}
    while (now := time.monotonic()) - started < most_s:
        seen = {path.name: _size(path) for path in folder.iterdir()} if folder.is_dir() else {}
        if seen != sizes:
            sizes, last_change = seen, now
        elif now - started >= least_s and now - last_change >= still_s:
            return
        time.sleep(0.25)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _answer(run_dir: RunDir, state: RankState, asked: float) -> tuple[Path, str] | None:
    """What rank R's faulthandler wrote when asked: its beat names its process. A rank that never beat (hung
    in its imports) is found by what was written lately; a minute's slack for a file server's clock, and an
    earlier step's stacks are older than any step's budget. Read before its time is looked at: opening a
    file on NFS refreshes what its attributes say."""
    if state.beat is not None:
        candidates = [run_dir.rank_stacks(state.rank, state.beat.pid)]
    else:
        candidates = run_dir.every_rank_stacks(state.rank)
    written = []
    for path in candidates:
        try:
            text, modified = path.read_text(errors="replace"), path.stat().st_mtime
        except OSError:
            continue
        if text and (state.beat is not None or modified >= asked - 60):
            written.append((modified, path, text))
    return max(written)[1:] if written else None


def _py_spy(spy: str, pid: int) -> str:
    """A consistent snapshot (the process paused a moment), or, for a stopped process that ptrace cannot
    pause, a read of its memory as it is."""
    for extra in ([], ["--nonblocking"]):
        try:
            done = subprocess.run(
                [spy, "dump", "--pid", str(pid), *extra], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout
    return ""


def end_step(run_dir: RunDir, hang: Hang, states: Sequence[RankState], task: SlurmTask) -> None:
    blamed = hang.rank
    history = RunHistory.read(run_dir)
    attempt = blamed.beat.attempt if blamed.beat and blamed.beat.attempt is not None else None
    if attempt is None:
        attempt = history.next_attempt(task.restart_count)
    name = f"attempt{attempt}-step{blamed.step}.txt"
    stacks = run_dir.stacks / name
    node = blamed.beat.node if blamed.beat else None
    steps_per_epoch = history.latest_plan.get("steps_per_epoch") or 1
    who = f"rank {blamed.rank} on {node or 'its node'}"
    if hang.alike:
        who = f"ranks {', '.join(map(str, hang.suspects))}, alike (which hung, their stacks may say),"
    message = (
        f"{who} made no progress for {blamed.stale_s:.0f} s in the {blamed.phase} phase (step "
        f"{blamed.step}), over the budget of {blamed.budget_s:.0f} s; stacks: {stacks}"
    )
    with RankLog(run_dir, 0, attempt=attempt) as log:
        log.event(
            Event.HANG,
            blamed.step,
            blamed.step / steps_per_epoch,
            hung_rank=blamed.rank,
            suspects=hang.suspects,
            alike=hang.alike,
            node=node,
            phase=blamed.phase,
            stale_s=round(max(blamed.stale_s, blamed.silent_s), 1),
            budget_s=blamed.budget_s,
            stacks=str(stacks),
            error=message,
        )
    # Logged before the stacks are taken (py-spy may need a minute): should a waiting peer's collective time
    # out meanwhile and srun end the step, the hang is on record, and triage blames the hung rank.
    dump_stacks(run_dir, states, task, name)
    print(f"asrlaunch: hang: {message}; ending the step", file=sys.stderr, flush=True)
    for step in task.running_steps():
        task.cancel_step(step, "KILL")


def supervise(
    run_dir: RunDir, task: SlurmTask, poll_s: float = POLL_S, step_start: float | None = None
) -> Hang | None:
    """Watch one step until a rank hangs (then end it) or the batch script stops us, after srun; a rank that
    is done is no longer watched. `step_start`: when the batch script started the step, on this node's clock
    (our own imports may take longer than the ranks' start on a cold file system)."""
    started = step_start or time.time()
    try:
        recipe = load_run_recipe(run_dir.recipe)
    except RecipeError:
        return None
    world, watch = recipe.cluster.world_size, Watch()
    while True:  # after the final save too: closing the trackers, the last barrier can hang as well
        time.sleep(poll_s)
        now = time.time()
        states = rank_states(recipe, watch.update(read_beats(run_dir), now), world, started, now)
        hang = judge(states)
        if hang is not None:
            end_step(run_dir, hang, states, task)
            return hang


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch supervise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", help="the job's run directory (a job array: every element's)")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between looks at the heartbeats")
    parser.add_argument(
        "--step-start", type=float, default=None, help="when the step started (epoch seconds)"
    )
    args = parser.parse_args(argv)
    # Stop signals for the tasks reach the batch step's every process (`scancel --full`, `B:` signals,
    # preemption): the supervisor watches on through the checkpoint they cause (a stalled file system hangs
    # there), and stops when the batch script's teardown sends it USR1.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
    task = SlurmTask.from_environ()
    run_dirs = args.run_dirs
    run_dir = RunDir(Path(run_dirs[task.array_index if len(run_dirs) > 1 else 0]))
    supervise(run_dir, task, args.poll, args.step_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
