"""What the tests against the real local SLURM cluster share: its marks, submitting a smoke job, waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.cli.cluster import task_pid
from asrlaunch.launcher.status import TERMINAL, collect_status

from .conftest import PYTHON, RECIPES, ROOT, python_env

SUBMIT, STATUS = str(ROOT / "launch" / "submit.py"), str(ROOT / "launch" / "status.py")
CLUSTER = ROOT / "slurm" / "cluster.sh"


def cluster_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


SLURM_MARKS = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not cluster_up() and not os.environ.get("CI"), reason="no local SLURM cluster"),
]


def launch(
    tmp_path: Path, corpus: Path, *args: str, env: dict[str, str] | None = None
) -> list[tuple[str, Path]]:
    defaults = [
        f"data.dir={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=4",
        "eval.steps=4",
        "eval.at_start=false",
        "logging.steps=2",
        "cluster.cpus_per_task=1",
    ]
    given = {arg.split("=", 1)[0] for arg in args}
    done = subprocess.run(
        [
            PYTHON,
            SUBMIT,
            str(RECIPES / "smoke.yaml"),
            *(default for default in defaults if default.split("=", 1)[0] not in given),
            "--executor",
            "slurm",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env or python_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = []
    for line in done.stdout.splitlines():
        if line.startswith("submitted slurm job"):
            job_id, run_dir = line.removeprefix("submitted slurm job ").split(": ")
            jobs.append((job_id, tmp_path / run_dir))
    assert jobs, done.stdout
    return jobs


def squeue_ids() -> set[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def wait_until_done(run_dirs: list[Path], timeout: float = 400) -> dict[Path, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {s.run_dir.path: s.job.state for s in collect_status(run_dirs)}
        if all(state in TERMINAL for state in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs still running after {timeout} s: {states}")


def last_train(run_dir: Path, attempt: int) -> int:
    """The last step trained by `attempt`, from rank 0's log (0 if none yet)."""
    from asrlaunch.core.logs import read_records

    path = run_dir / "logs" / "rank0.jsonl"
    if not path.exists():
        return 0
    steps = [r["step"] for r in read_records(path) if r["kind"] == "train" and r["attempt"] == attempt]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, attempt: int, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = last_train(run_dir, attempt)
        if step >= at_least:
            return step
        time.sleep(0.5)
    raise AssertionError(f"attempt {attempt} did not reach step {at_least}: {collect_status([run_dir])}")


def preempt_with_a_high_priority_job() -> None:
    """A short job on the `high` partition that needs every node: SLURM preempts (requeues) `low` jobs."""
    subprocess.run(
        ["sbatch", "-p", "high", "--nodes=3", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 3"],
        check=True,
        capture_output=True,
    )


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def kill_rank(job_id: str, rank: int, signum: int = signal.SIGKILL) -> None:
    """kill -9 a rank's task by default; SIGSTOP is the shape of a GPU kernel hang or a stalled disk."""
    os.kill(task_pid(job_id, rank), signum)


def same_weights(a: Path, b: Path) -> bool:
    """Two runs' final models, tensor by tensor, bitwise."""
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(str(run / "final" / "model.safetensors")) for run in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
