"""One line per run: SLURM state (squeue, then sacct, then `squeue -t all`) and progress from the logs.

Launcher side: no torch, one scheduler query per source for all runs; of each log, the tail is parsed for
progress and only the `meta` lines of the rest (starts and stops).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# PREEMPTED is not final: a requeued job passes through it on its way back to PENDING.
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
}
TAIL_BYTES = 64 * 1024


@dataclass
class JobState:
    state: str = "UNKNOWN"
    nodes: str = ""
    elapsed: str = ""
    restarts: int | None = None
    source: str = ""


@dataclass
class RunStatus:
    run_dir: Path
    job_id: str = ""
    job: JobState = field(default_factory=JobState)
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    wer: float | None = None
    samples_per_s: float | None = None
    # (attempt, step it started from) for every start of rank 0, and the stop events (timeout, preemption)
    starts: list[tuple[int, int]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)

    @property
    def eta_s(self) -> float | None:
        if None in (self.step, self.total_steps, self.samples_per_s) or not self.samples_per_s:
            return None
        plan = _read_json(self.run_dir / "plan.json")
        global_batch = plan.get("global_batch", 32)
        return (self.total_steps - self.step) * global_batch / self.samples_per_s  # type: ignore[operator]


def _run(command: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def parse_squeue(text: str) -> dict[str, JobState]:
    """Lines of `squeue -h -o '%i|%T|%N|%M'` (pending array elements are expanded with -r)."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            states[parts[0]] = JobState(parts[1], parts[2], parts[3], source="squeue")
    return states


def parse_sacct(text: str) -> dict[str, JobState]:
    """Lines of `sacct -X -n -P -o JobID,State,NodeList,Elapsed`; `CANCELLED by 0` -> CANCELLED."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            states[parts[0]] = JobState(parts[1].split()[0], parts[2], parts[3], source="sacct")
    return states


def parse_restarts(text: str) -> dict[str, int]:
    """`scontrol show job` output -> restart count per job id (array elements as ID_INDEX)."""
    restarts: dict[str, int] = {}
    for block in text.split("\n\n"):
        fields = dict(f.split("=", 1) for f in block.split() if "=" in f)
        if "JobId" not in fields:
            continue
        key = fields["JobId"]
        if fields.get("ArrayJobId") and fields.get("ArrayTaskId", "").isdigit():
            key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        restarts[key] = int(fields.get("Restarts", "0"))
    return restarts


def slurm_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """States of SLURM jobs: squeue for live ones, then sacct, then `squeue -t all` (no accounting)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    ids = ",".join(wanted)
    states = parse_squeue(_run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%N|%M"]) or "")
    missing = [j for j in wanted if j not in states]
    if missing:
        found = parse_sacct(
            _run(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", "JobID,State,NodeList,Elapsed"])
            or ""
        )
        states.update({k: v for k, v in found.items() if k in missing})
    missing = [j for j in wanted if j not in states]
    if missing:
        found = parse_squeue(_run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%N|%M"]) or "")
        states.update(
            {
                k: JobState(v.state, v.nodes, v.elapsed, source="squeue -t all")
                for k, v in found.items()
                if k in missing
            }
        )
    restarts = parse_restarts(_run(["scontrol", "show", "job"]) or "")
    for key, state in states.items():
        state.restarts = restarts.get(key, state.restarts)
    return states


LOCAL_CONTROLLER = "submitit.local._local"  # the module submitit's local executor runs as the job's process


def _local_job_alive(pid: int) -> bool:
    """The local job's controller still runs. A zombie (ended, not yet reaped by the launcher that started it)
    counts as ended, and so does a pid that now belongs to another program (reused after the job ended)."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().split(")")[-1].split()[0]
        command = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return state != "Z" and LOCAL_CONTROLLER.encode() in command


def local_state(job_id: str, run_dir: Path) -> JobState:
    """submitit's local executor: the job id is the process id."""
    if job_id.isdigit() and _local_job_alive(int(job_id)):
        return JobState("RUNNING", "localhost", source="process")
    finished = (run_dir / "final" / "trainer_state.json").exists()
    return JobState("COMPLETED" if finished else "FAILED", "localhost", source="process")


def tail_records(path: Path) -> list[dict[str, Any]]:
    """The records in the last 64 KiB of a log (a partial first or last line is dropped)."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - TAIL_BYTES))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines[1:] if size > TAIL_BYTES else lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def progress_from_logs(status: RunStatus) -> None:
    records = tail_records(status.run_dir / "logs" / "rank0.jsonl")
    status.total_steps = _read_json(status.run_dir / "plan.json").get("total_steps")
    for record in records:
        if record.get("kind") == "train":
            status.step, status.epoch, status.loss = record["step"], record["epoch"], record.get("loss")
            status.samples_per_s = record.get("samples_per_s")
        elif record.get("kind") == "eval":
            status.wer = record.get("wer")
            status.step = max(status.step or 0, record["step"])
    for meta in meta_records(status.run_dir / "logs" / "rank0.jsonl"):
        if meta.get("event"):
            status.stops.append(meta["event"])
        else:
            status.starts.append((meta.get("attempt", 0), meta.get("resumed_from") or 0))


def meta_records(path: Path) -> list[dict[str, Any]]:
    """Only the meta records of a log (cheap: other lines are not parsed)."""
    records = []
    try:
        with path.open("rb") as file:
            for line in file:
                if line.startswith(b'{"kind": "meta"'):
                    try:
                        records.append(json.loads(line))
                    except ValueError:  # a torn line
                        continue
    except OSError:
        return []
    return records


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories, with a sweep's root standing for all its elements."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "recipe.yaml").exists():
            runs.append(path)
        else:
            runs.extend(sorted(p.parent for p in path.glob("*/recipe.yaml")))
    return runs


def collect_status(paths: Sequence[str | Path]) -> list[RunStatus]:
    statuses = []
    for run_dir in expand_run_dirs(paths):
        jobs = _read_json(run_dir / "job.json").get("jobs", [])
        status = RunStatus(run_dir, job_id=jobs[-1]["job_id"] if jobs else "")
        status.job.source = jobs[-1]["executor"] if jobs else ""
        progress_from_logs(status)
        statuses.append(status)
    slurm = slurm_states(s.job_id for s in statuses if s.job_id and s.job.source == "slurm")
    for status in statuses:
        if status.job.source == "slurm":
            status.job = slurm.get(status.job_id, JobState("UNKNOWN", source="slurm"))
        elif status.job.source == "local":
            status.job = local_state(status.job_id, status.run_dir)
    return statuses


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


HEADER = (
    "RUN",
    "JOB",
    "STATE",
    "NODES",
    "ELAPSED",
    "RESTARTS",
    "RESUMED AT",
    "STOPS",
    "STEP",
    "EPOCH",
    "LOSS",
    "WER",
    "SAMPLES/S",
    "ETA",
)


def stop_summary(stops: Sequence[str]) -> str:
    """`preemption x2, timeout x1`: timeouts and preemptions are counted apart."""
    counts = {kind: stops.count(kind) for kind in dict.fromkeys(stops)}
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items()) or "-"


def format_table(statuses: Sequence[RunStatus]) -> str:
    rows = [HEADER]
    for s in statuses:
        step = f"{_fmt(s.step)}/{_fmt(s.total_steps)}"
        rows.append(
            (
                str(s.run_dir),
                s.job_id or "-",
                s.job.state,
                s.job.nodes or "-",
                s.job.elapsed or "-",
                _fmt(s.job.restarts),
                ",".join(str(start) for _, start in s.starts[1:]) or "-",
                stop_summary(s.stops),
                step,
                _fmt(s.epoch, ".2f"),
                _fmt(s.loss, ".4f"),
                _fmt(s.wer, ".4f"),
                _fmt(s.samples_per_s, ".1f"),
                _eta(s.eta_s) if s.job.state not in TERMINAL else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
