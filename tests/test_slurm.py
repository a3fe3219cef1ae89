"""Against the real local SLURM cluster (`bash slurm/cluster.sh start`): submit, arrays, status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from asrlaunch.status import TERMINAL, collect_status

from .conftest import PYTHON, RECIPES, ROOT, python_env

SUBMIT, STATUS = str(ROOT / "launch" / "submit.py"), str(ROOT / "launch" / "status.py")
CLUSTER = ROOT / "slurm" / "cluster.sh"


def _cluster_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not _cluster_up() and not os.environ.get("CI"), reason="no local SLURM cluster"),
]


def launch(tmp_path: Path, corpus: Path, *args: str) -> list[tuple[str, Path]]:
    done = subprocess.run(
        [
            PYTHON,
            SUBMIT,
            str(RECIPES / "smoke.yaml"),
            f"data.dir={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=4",
            "eval.steps=4",
            "eval.at_start=false",
            "logging.steps=2",
            "cluster.cpus_per_task=1",
            "--executor",
            "slurm",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(),
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
        states = {s.run_dir: s.job.state for s in collect_status(run_dirs)}
        if all(state in TERMINAL for state in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs still running after {timeout} s: {states}")


def test_two_node_job_runs_and_completes(tmp_path: Path, tones_corpus: Path) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "cluster.nodes=2", "cluster.processes_per_node=1")
    seen_running = False
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        (status,) = collect_status([run_dir])
        if status.job.state == "RUNNING":
            assert job_id in squeue_ids()
            shown = subprocess.run(
                [PYTHON, STATUS, str(run_dir)], capture_output=True, text=True, env=python_env()
            )
            assert "RUNNING" in shown.stdout and job_id in shown.stdout
            seen_running = True
        if status.job.state in TERMINAL:
            break
        time.sleep(1)
    assert seen_running
    assert status.job.state == "COMPLETED", (run_dir / "submitit").glob("*.err")
    assert status.job.nodes == "node[1-2]" and status.step == 4 and status.total_steps == 4
    metas = [
        json.loads(line)
        for rank in (0, 1)
        for line in (run_dir / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "meta"
    ]
    assert [m["world_size"] for m in metas] == [2, 2]
    assert metas[0]["plan"] == metas[1]["plan"]
    assert metas[0]["job_id"] == metas[1]["job_id"] == job_id
    assert (run_dir / "final" / "model.safetensors").exists()
    shown = subprocess.run(
        [PYTHON, STATUS, str(run_dir), "--json"], capture_output=True, text=True, env=python_env()
    )
    record = json.loads(shown.stdout)
    assert record["job"]["state"] == "COMPLETED" and record["job"]["source"] == "sacct"
    assert record["step"] == 4 and record["wer"] is not None


def test_sweep_is_one_job_array_and_both_complete(tmp_path: Path, tones_corpus: Path) -> None:
    jobs = launch(tmp_path, tones_corpus, "run.name=sweep", "--sweep", "train.seed=1,2")
    assert len(jobs) == 2
    array_ids = {job_id.split("_")[0] for job_id, _ in jobs}
    assert len(array_ids) == 1 and [j.split("_")[1] for j, _ in jobs] == ["0", "1"]
    states = wait_until_done([run_dir for _, run_dir in jobs])
    assert set(states.values()) == {"COMPLETED"}
    for _, run_dir in jobs:
        assert (run_dir / "recipe.yaml").exists() and (run_dir / "final" / "config.json").exists()
    seeds = {
        json.loads((d / "logs" / "rank0.jsonl").read_text().splitlines()[0])["recipe"]["train"]["seed"]
        for _, d in jobs
    }
    assert seeds == {1, 2}
    # the sweep's root stands for all its elements
    shown = subprocess.run(
        [PYTHON, STATUS, str(tmp_path / "runs" / "sweep")], capture_output=True, text=True, env=python_env()
    )
    assert shown.stdout.count("COMPLETED") == 2


def test_status_without_accounting_falls_back_to_squeue(tmp_path: Path, tones_corpus: Path) -> None:
    ((job_id, run_dir),) = launch(tmp_path, tones_corpus, "run.name=noacct")
    subprocess.run(["bash", str(CLUSTER), "dbd-stop"], check=True, capture_output=True)
    try:
        assert subprocess.run(["sacct", "-j", job_id], capture_output=True).returncode != 0
        states = wait_until_done([run_dir])
        (status,) = collect_status([run_dir])
        assert states[run_dir] == "COMPLETED"
        assert status.job.source == "squeue -t all"
        assert status.job.restarts == 0
    finally:
        subprocess.run(["bash", str(CLUSTER), "dbd-start"], check=True, capture_output=True)
