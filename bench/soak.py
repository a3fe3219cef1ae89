"""Soak: one run on the local SLURM cluster through a seeded random schedule of stops, then the checks.

    python bench/soak.py recipes/smoke.yaml --stops 10 --seed 1 [key=value ...]

Stops are drawn from: preemption by a high-priority job, `scancel --signal=USR2 --full`, a time limit,
kill -9 of a random rank, a node set down, SIGSTOP of a random rank (a hang the supervisor must end, with
`train.hang_timeout_s=30`). The run (2 nodes x 1 task, partition `low`) must end COMPLETED with final weights
bitwise equal to an uninterrupted run of the same recipe (torchrun, 2 processes), no step missing or counted
twice in the merged table, and every stop in the logs with its kind. It prints the run's goodput and, for
each stop, the time from the end of the stopped step to the next step trained, for in-job restarts and for
requeues apart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from asrlaunch.cli.cluster import task_pid
from asrlaunch.core.goodput import goodput, restarted_in_allocation
from asrlaunch.core.history import RunHistory
from asrlaunch.core.records import Event, Kind
from asrlaunch.core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("preemption", "usr2", "time_limit", "kill_rank", "node_down", "hang")
# What each stop leaves in the logs: its own stop event (the trainer's or failover's).
LOGGED_AS = {
    "preemption": Event.PREEMPTION,
    "usr2": Event.PREEMPTION,
    "time_limit": Event.TIMEOUT,
    "kill_rank": Event.FAILURE,
    "node_down": Event.TERMINATED,
    "hang": Event.HANG,
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, env=ENV).stdout


def starts(run_dir: Path) -> list[dict]:
    from asrlaunch.core.logs import meta_records
    from asrlaunch.core.records import is_start
    from asrlaunch.core.rundir import RunDir

    return [m for m in meta_records(RunDir(run_dir).rank_log(0)) if is_start(m)]


def trained(run_dir: Path, attempt: int) -> int:
    from asrlaunch.core.logs import read_records

    log = RunDir(run_dir).rank_log(0)
    steps = (
        [r["step"] for r in read_records(log) if r["kind"] == Kind.TRAIN and r["attempt"] == attempt]
        if log.exists()
        else []
    )
    return max(steps, default=0)


def latencies(history: RunHistory) -> dict[str, list[float]]:
    """Seconds from the end of each stopped attempt (its last record) to the next attempt's first trained
    step, for restarts inside the allocation and for everything that went back to the queue."""
    found: dict[str, list[float]] = {"restart in the job": [], "requeue": []}
    for before, after in itertools.pairwise(history.attempts):
        first = [r["time"] for r in after.records if r["kind"] == Kind.TRAIN and r["rank"] == 0]
        if not first or before.last_time is None:
            continue
        path = "restart in the job" if restarted_in_allocation(before) else "requeue"
        found[path].append(round(min(first) - before.last_time, 1))
    return found


def job_field(job_id: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", run("scontrol", "show", "job", job_id))
    return match.group(1) if match else ""


def wait(condition, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: timed out waiting for {what}")
        time.sleep(0.5)


def kill_rank(job_id: str, rank: int, signum: int = signal.SIGKILL) -> None:
    os.kill(task_pid(job_id, rank), signum)


def stop(how: str, job_id: str, rng: random.Random) -> str:
    """Apply one stop; returns what to undo afterwards (a node to resume), if anything."""
    if how == "preemption":
        run("sbatch", "-p", "high", "--nodes=3", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 3")
    elif how == "usr2":
        run("scancel", "--signal=USR2", "--full", job_id)
    elif how == "time_limit":  # 100 s left: the USR2@90 warning is due within seconds
        hours, minutes, seconds = (["0", "0", *job_field(job_id, "RunTime").split(":")])[-3:]
        elapsed = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
        limit = elapsed + 100
        run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit // 60}:{limit % 60:02d}")
    elif how == "kill_rank":
        kill_rank(job_id, rng.randrange(2))
    elif how == "hang":
        kill_rank(job_id, rng.randrange(2), signal.SIGSTOP)
    elif how == "node_down":
        node = rng.choice(run("scontrol", "show", "hostnames", job_field(job_id, "NodeList")).split())
        run("scontrol", "update", f"nodename={node}", "state=down", "reason=soak")
        return node
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--stops", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="train.max_steps of the soaked run")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    schedule = [rng.choice(KINDS) for _ in range(args.stops)]
    work = Path(args.work or tempfile.mkdtemp(prefix="soak-"))
    common = [
        f"train.max_steps={args.steps}",
        "logging.steps=1",
        "checkpoint.save_steps=5",
        "eval.at_start=false",
        f"data.cache_dir={work / 'cache'}",
        "train.collective_timeout_s=60",
        "train.hang_timeout_s=30",
        *args.overrides,
    ]
    job_shape = [
        "cluster.nodes=2",
        "cluster.processes_per_node=1",
        "cluster.cpus_per_task=1",
        "cluster.partition=low",
        "cluster.time_min=30",
        "cluster.signal_delay_s=90",
        f"cluster.max_requeues={args.stops + 2}",
        f"cluster.max_failures={args.stops + 2}",
        f"run.output_root={work}",
        "run.name=soak",
    ]
    started = time.monotonic()
    out = run(
        sys.executable,
        str(ROOT / "launch" / "submit.py"),
        args.recipe,
        *common,
        *job_shape,
        "--executor",
        "slurm",
    )
    job_id = re.search(r"submitted slurm job ([0-9_]+)", out).group(1)  # type: ignore[union-attr]
    run_dir = work / "soak"
    print(f"soak: job {job_id}, {args.stops} stops (seed {args.seed}): {', '.join(schedule)}", flush=True)
    stopped_at = 0
    for index, how in enumerate(schedule):
        begun = starts(run_dir)  # one read of rank 0's log per stop
        latest = begun[-1] if begun else {"attempt": 0, "step": 0}
        attempt = latest["attempt"]
        # past the previous stop: two failures at one step are, by design, a fault that repeats (not retried)
        target = max(stopped_at, latest["step"]) + rng.randint(3, 8)
        wait(
            lambda a=attempt, t=target: trained(run_dir, a) >= t, f"attempt {attempt} to reach step {target}"
        )
        undo = stop(how, job_id, rng)
        after = f"a new attempt after stop {index + 1} ({how})"
        if how == "time_limit":  # the limit back before the requeued job starts, else it stops at once
            wait(lambda: job_field(job_id, "JobState") != "RUNNING", "the time-limit stop", 300)
            run("scontrol", "update", f"JobId={job_id}", "TimeLimit=30")
        wait(lambda a=attempt: starts(run_dir)[-1]["attempt"] > a, after, 600)
        if undo:  # ReturnToService=2 may have brought the node back already: then this is refused
            subprocess.run(["scontrol", "update", f"nodename={undo}", "state=resume"], capture_output=True)
        stopped_at = trained(run_dir, attempt)
        print(
            f"  stop {index + 1}: {how} at step {stopped_at} -> attempt {attempt + 1}",
            flush=True,
        )
    wait(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", 900)
    wall = time.monotonic() - started
    state = job_field(job_id, "JobState")
    straight = work / "straight"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "asrlaunch",
            "train",
            args.recipe,
            "--run-dir",
            str(straight),
            *common,
        ],
        check=True,
        capture_output=True,
        env={**ENV, "OMP_NUM_THREADS": "1"},
    )
    import torch
    from safetensors.torch import load_file

    from asrlaunch.core.logs import read_run_logs
    from asrlaunch.results.merge import merge_records

    a, b = (load_file(str(RunDir(p).final / "model.safetensors")) for p in (straight, run_dir))
    bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = read_run_logs(run_dir)
    merged = merge_records(records)
    logged = Counter(
        r["event"]
        for r in records
        if r.get("event") in {e.value for e in LOGGED_AS.values()} and r["rank"] == 0
    )
    expected = Counter(LOGGED_AS[how].value for how in schedule)
    result = {
        "state": state,
        "wall_s": round(wall, 1),
        "stops": dict(Counter(schedule)),
        "restarts": int(job_field(job_id, "Restarts") or 0),
        "bitwise_equal_to_uninterrupted": bitwise,
        "every_step_once": list(merged.train) == list(range(1, args.steps + 1)),
        "stop_events_logged": dict(logged),
        "every_stop_logged": all(logged[k] >= n for k, n in expected.items()),
        "goodput": goodput(merged.history).summary(),
        "stop_to_next_step_s": latencies(merged.history),
    }
    print(json.dumps(result, indent=1))
    ok = state == "COMPLETED" and bitwise and result["every_step_once"] and result["every_stop_logged"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
