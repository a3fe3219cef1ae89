"""What the scheduler says about jobs: squeue, then sacct, then `squeue -t all`, and scontrol for restarts;
submitit's local executor by process. Parsers are pure functions of the commands' text (tested on pasted
output); the queries are thin. Launcher side: no torch.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asrlaunch.core.rundir import RunDir

# PREEMPTED is not final by itself: a requeued job passes through it on its way back to PENDING.
PREEMPTED = "PREEMPTED"
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
SQUEUE_FORMAT = "%i|%T|%N|%M|%r"
# A job that waits for `scontrol release` (failover's requeue holds one to change its excluded nodes).
HELD_STATE, USER_HOLD, ADMIN_HOLD = "REQUEUE_HOLD", "JobHeldUser", "JobHeldAdmin"
# A pending job's reason when a job it depends on failed (afterok): it never starts.
NEVER_SATISFIED = "DependencyNeverSatisfied"
SACCT_FIELDS = "JobID,State,NodeList,Elapsed"
# `--signal` may come up to this much before its delay (sbatch(1): SLURM's event resolution).
SIGNAL_RESOLUTION_S = 60


@dataclass
class JobState:
    state: str = "UNKNOWN"
    nodes: str = ""
    elapsed: str = ""
    restarts: int | None = None
    source: str = ""
    reason: str = ""  # why a job waits (squeue's %r), e.g. Resources, Priority, PartitionConfig

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL

    @property
    def may_have_ended(self) -> bool:
        """A state that is final when it lasts: UNKNOWN (the scheduler purged the job, or did not answer) or
        PREEMPTED (preempted and not requeued, PreemptMode=CANCEL; a requeued job only passes through it, and
        accounting may show it there while a busy controller does not answer)."""
        return self.state in ("UNKNOWN", PREEMPTED)


def run_command(command: Sequence[str], timeout_s: float = 15) -> str | None:
    """stdout of a scheduler command, or None when it fails or is missing (status must not crash)."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _reason(text: str) -> str:
    return "" if text in ("None", "(null)") else text


def parse_squeue(text: str, source: str = "squeue") -> dict[str, JobState]:
    """Lines of `squeue -h -r -o '%i|%T|%N|%M|%r'` (pending array elements expanded with -r)."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            reason = _reason(parts[4]) if len(parts) > 4 else ""
            states[parts[0]] = JobState(parts[1], parts[2], parts[3], source=source, reason=reason)
    return states


def parse_sacct(text: str) -> dict[str, JobState]:
    """Lines of `sacct -X -n -P -o JobID,State,NodeList,Elapsed`; `CANCELLED by 0` -> CANCELLED. A requeued
    job has one line per run under the same id: the last one is the current state."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[1]:
            states[parts[0]] = JobState(parts[1].split()[0], parts[2], parts[3], source="sacct")
    return states


def parse_scontrol_jobs(text: str) -> dict[str, dict[str, str]]:
    """`scontrol show job` (one block per job, `Key=Value` fields) -> job id -> fields. Array elements are
    keyed ARRAYID_INDEX, as squeue and sacct name them."""
    jobs: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(f.split("=", 1) for f in block.split() if "=" in f)
        if "JobId" not in fields:
            continue
        key = fields["JobId"]
        if fields.get("ArrayJobId") and fields.get("ArrayTaskId", "").isdigit():
            key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        jobs[key] = fields
    return jobs


def parse_restarts(text: str) -> dict[str, int]:
    """`scontrol show job` output -> restart count per job id."""
    return {key: int(fields.get("Restarts", "0")) for key, fields in parse_scontrol_jobs(text).items()}


def job_restarts(job_ids: Sequence[str], one_by_one_up_to: int = 16) -> dict[str, int]:
    """Restart counts, from `scontrol show job` of each wanted job (an array's id shows all its elements):
    a busy controller is not asked for its whole table at every poll, unless many jobs are wanted."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if len(arrays) > one_by_one_up_to:
        return parse_restarts(run_command(["scontrol", "show", "job"]) or "")
    restarts: dict[str, int] = {}
    deadline = time.monotonic() + 15.0  # a silent controller: one timeout's wait per poll, not one per job
    for array in arrays:
        if time.monotonic() >= deadline:
            break
        restarts.update(parse_restarts(run_command(["scontrol", "show", "job", array]) or ""))
    return restarts


def parse_time_left(text: str) -> float | None:
    """squeue's %L ('1-02:03:04', '2:03:04', '3:04', 'UNLIMITED') in seconds."""
    text = text.strip()
    if not text or text in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds


def slurm_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """States of SLURM jobs: squeue for live ones, then sacct, then `squeue -t all` (no accounting)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    states = parse_squeue(
        run_command(["squeue", "-h", "-r", "-j", ",".join(wanted), "-o", SQUEUE_FORMAT]) or ""
    )
    missing = [j for j in wanted if j not in states]
    if missing:
        found = parse_sacct(
            run_command(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", SACCT_FIELDS]) or ""
        )
        states.update({k: v for k, v in found.items() if k in missing})
    missing = [j for j in wanted if j not in states]
    if missing:
        found = parse_squeue(
            run_command(["squeue", "-h", "-r", "-t", "all", "-o", SQUEUE_FORMAT]) or "",
            source="squeue -t all",
        )
        states.update({k: v for k, v in found.items() if k in missing})
    restarts = job_restarts(wanted)
    for key, state in states.items():
        state.restarts = restarts.get(key, state.restarts)
    return states


LOCAL_CONTROLLER = "submitit.local._local"  # the module submitit's local executor runs as the job's process


def local_job_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """The local job's controller still runs. A zombie (ended, not yet reaped by the launcher that started it)
    counts as ended, and so does a pid that now belongs to another program (reused after the job ended)."""
    try:
        state = (proc / str(pid) / "stat").read_text().split(")")[-1].split()[0]
        command = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return state != "Z" and LOCAL_CONTROLLER.encode() in command


def local_state(job_id: str, run_dir: RunDir) -> JobState:
    """submitit's local executor: the job id is the process id."""
    if job_id.isdigit() and local_job_alive(int(job_id)):
        return JobState("RUNNING", "localhost", source="process")
    return JobState("COMPLETED" if run_dir.is_finished() else "FAILED", "localhost", source="process")
