"""Which rank failed first, on which node, how, and what it said last; which nodes of the job are unhealthy,
and whether the job still fits without them. No torch.

Sources, best first: the supervisor's `hang` event (it named the rank); srun's own report of its tasks in the
batch script's error output (`srun: error: node2: task 1: Killed`: srun reports tasks in the order they end,
so the first such line of the step is the first failure); the ranks' own `crash` / `error` events (by time).
The batch script writes `asrlaunch: step starts` to that output before each srun, so only the current step's
lines are read. The parsers are pure and tested on pasted output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.history import Attempt
from asrlaunch.core.records import Event
from asrlaunch.core.rundir import RunDir
from asrlaunch.job.scheduler import run_command
from asrlaunch.job.task import SlurmTask, hostnames

STEP_MARKER = "asrlaunch: step starts"
SRUN_TASK = re.compile(r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[0-9,-]+): (?P<how>.+)$")
# Node states a job cannot run on, in scontrol's long names or sinfo's short ones (`drng`, `futr`), any case;
# sinfo marks a node that does not respond with a `*` after its state.
UNUSABLE = ("down", "drain", "drng", "fail", "futr", "future", "unk", "not_responding")
OUTPUT_LINES = 10


@dataclass(frozen=True)
class FirstFailure:
    rank: int
    node: str | None
    exit: str  # `signal KILL`, `exit code 1`, `hang (no progress ...)`, `error: ...`
    output: list[str]
    stacks: str | None = None

    def fields(self) -> dict[str, Any]:
        fields = {"first_rank": self.rank, "first_node": self.node, "first_exit": self.exit}
        return {**fields, "first_output": self.output, **({"stacks": self.stacks} if self.stacks else {})}


def srun_failures(text: str) -> list[tuple[str, int, str]]:
    """(node, first task, how it ended) of srun's task reports after the step's marker, in srun's order."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(STEP_MARKER)]
    found = []
    for line in lines[starts[-1] + 1 if starts else 0 :]:
        matched = SRUN_TASK.match(line.strip())
        if matched:
            first = int(re.split(r"[,-]", matched["tasks"])[0])
            found.append((matched["node"], first, describe_exit(matched["how"])))
    return found


def describe_exit(how: str) -> str:
    """srun's words for how a task ended, as `signal NAME` or `exit code N`."""
    code = re.match(r"Exited with exit code (\d+)", how)
    if code:
        return f"exit code {code[1]}"
    names = {"Killed": "KILL", "Terminated": "TERM", "Segmentation fault": "SEGV", "Aborted": "ABRT"}
    return f"signal {names[how]}" if how in names else how


def tail_lines(path: Path, count: int = OUTPUT_LINES) -> list[str]:
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - 64 * 1024))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]


def last_words(submitit: Path, task: SlurmTask, rank: int) -> list[str]:
    """The last lines a rank wrote: its error output (a traceback), else its standard output."""
    errors = tail_lines(task_output(submitit, task, rank))
    return errors or tail_lines(task_output(submitit, task, rank, "stdout"))


def task_output(submitit: Path, task: SlurmTask, rank: int, stream: str = "stderr") -> Path:
    """A task's output file, as submitit names it (`%j_%t_log.err`, `%A_%a_%t_log.err` for arrays)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(submitit, job_id=task.target or "0", task_id=rank)
    return Path(paths.stderr if stream == "stderr" else paths.stdout)


def node_of(attempt: Attempt, rank: int) -> str | None:
    return next((s.get("node") for s in attempt.starts if s["rank"] == rank), None)


def first_failure(run_dir: RunDir, attempt: Attempt, submitit: Path, task: SlurmTask) -> FirstFailure | None:
    hangs = attempt.of(Event.HANG)
    if hangs:
        hang = hangs[0]
        rank = int(hang["hung_rank"])
        how = f"hang (no progress for {hang.get('stale_s')} s in its {hang.get('phase')} phase)"
        output = last_words(submitit, task, rank)
        if hang.get("alike"):  # no rank to blame, no node to leave out
            how = f"hang of ranks {hang.get('suspects')} alike ({hang.get('phase')} phase): see the stacks"
            return FirstFailure(rank, None, how, output, hang.get("stacks"))
        return FirstFailure(rank, hang.get("node") or node_of(attempt, rank), how, output, hang.get("stacks"))
    reported = srun_failures("\n".join(tail_lines(task_output(submitit, task, 0), 400)))
    if reported:
        node, rank, how = reported[0]
        return FirstFailure(rank, node, how, last_words(submitit, task, rank))
    errors = sorted(attempt.of(Event.CRASH, Event.ERROR), key=lambda e: e["time"])
    if errors:
        rank = int(errors[0]["rank"])
        output = last_words(submitit, task, rank)
        return FirstFailure(rank, node_of(attempt, rank), f"error: {errors[0].get('error', '')}", output)
    return None


def node_states(text: str) -> dict[str, str]:
    """`scontrol show node` blocks -> node name -> State (`IDLE`, `DOWN+DRAIN`, `IDLE+NOT_RESPONDING` ...)."""
    states = {}
    for block in text.split("\n\n"):
        fields = dict(f.split("=", 1) for f in block.split() if "=" in f)
        if "NodeName" in fields:
            states[fields["NodeName"]] = fields.get("State", "")
    return states


def unhealthy_nodes(task: SlurmTask) -> list[str]:
    """The job's nodes that SLURM set down, drained or lost contact with."""
    if not task.nodelist:
        return []
    nodes = hostnames(task.nodelist)
    states = node_states(run_command(["scontrol", "show", "node", ",".join(nodes)]) or "")
    return [node for node in nodes if unusable(states.get(node, ""))]


def partition_room(task: SlurmTask, leave_out: list[str]) -> int | None:
    """Healthy nodes of the job's partition beyond what the job needs once `leave_out` (and the nodes it
    already excludes) are gone; None when the scheduler does not say."""
    job = task.show()
    partition, needed = job.get("Partition"), job.get("NumNodes", "").split("-")[0]
    if not partition or not needed.isdigit():
        return None
    shown = run_command(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%t"])
    if shown is None:
        return None
    excluded = set(leave_out)
    known = job.get("ExcNodeList", "(null)")
    if known not in ("(null)", ""):
        excluded |= set(hostnames(known))
    return len(usable_nodes(shown) - excluded) - int(needed)


def unusable(state: str) -> bool:
    """A node state (`DOWN+DRAIN`, `IDLE+NOT_RESPONDING`, `drng`, `idle*`) a job cannot run on."""
    return state.endswith("*") or any(word in state.lower() for word in UNUSABLE)


def usable_nodes(sinfo: str) -> set[str]:
    """Nodes of `sinfo -h -N -o '%N|%t'` a job could start on."""
    return {
        name
        for name, state in (line.split("|", 1) for line in sinfo.split() if "|" in line)
        if not unusable(state)
    }
