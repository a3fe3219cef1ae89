"""The launcher's local executor (submitit's LocalExecutor, where there is no SLURM): a job run to the end,
its time limit and stop signal, its status, a submission that fails, and when `--executor auto` picks it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.plan import plan_run
from asrlaunch.core.recipe import load_recipe
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine import checkpoint
from asrlaunch.job.scheduler import local_state
from asrlaunch.launcher.submission import make_executor

from .conftest import RECIPES
from .test_launcher import submit


def test_local_executor_runs_a_job_to_completion(tmp_path: Path, tones_corpus: Path) -> None:
    done = submit(
        str(RECIPES / "smoke.yaml"),
        f"data.dir={tones_corpus}",
        f"data.cache_dir={tmp_path / 'c'}",
        "train.max_steps=2",
        "eval.at_start=false",
        "--executor",
        "local",
        "--wait",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted local job" in done.stdout and "COMPLETED: runs/smoke" in done.stdout
    assert (tmp_path / "runs" / "smoke" / "final" / "model.safetensors").exists()
    again = submit(
        str(RECIPES / "smoke.yaml"), f"data.dir={tones_corpus}", "--executor", "local", cwd=tmp_path
    )
    assert again.returncode == 2 and "holds a run already" in again.stderr
    # the finished run resumed: refused (its job would have nothing to do), nothing written
    run_dir = tmp_path / "runs" / "smoke"
    records, jobs = read_run_logs(run_dir), RunDir(run_dir).jobs()
    resubmitted = submit("--resume", str(run_dir), "train.max_steps=99", "--executor", "local", cwd=tmp_path)
    assert resubmitted.returncode == 2 and "finished already" in resubmitted.stderr
    assert read_run_logs(run_dir) == records and RunDir(run_dir).jobs() == jobs
    assert "max_steps: 99" not in RunDir(run_dir).recipe.read_text()


def test_a_failed_resume_submission_gives_the_run_its_recipe_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asrlaunch.launcher import submission
    from asrlaunch.launcher.sweep import RunSpec

    recipe = load_recipe(RECIPES / "smoke.yaml", ["data.dir=x"])
    run_dir = RunDir(tmp_path / "run")
    run_dir.create(recipe.to_yaml(), plan_run(recipe, 1).to_dict())
    before = (run_dir.recipe.read_bytes(), run_dir.plan.read_bytes())
    longer = load_recipe(RECIPES / "smoke.yaml", ["data.dir=x", "cluster.time_min=90", "train.max_steps=9"])

    def unreachable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("sbatch: error: Batch job submission failed: Socket timed out")

    monkeypatch.setattr(submission, "make_executor", unreachable)
    with pytest.raises(submission.SubmitError, match="nothing was submitted"):
        submission.submit([RunSpec(longer, ("cluster.time_min=90",), run_dir)], "local", resume=True)
    assert (run_dir.recipe.read_bytes(), run_dir.plan.read_bytes()) == before


def test_local_executor_gets_the_recipes_time_limit_and_signal_delay(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "smoke.yaml", ["cluster.time_min=7", "cluster.signal_delay_s=42"])
    parameters = make_executor("local", tmp_path, recipe).parameters
    assert parameters["timeout_min"] == 7 and parameters["signal_delay_s"] == 42
    assert parameters["tasks_per_node"] == recipe.cluster.tasks_per_node


def test_local_status_follows_the_controller_process_not_any_pid(tmp_path: Path) -> None:
    controller = subprocess.Popen(  # argv as submitit's local controller has it
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "submitit.local._local", str(tmp_path)]
    )
    try:
        deadline = time.monotonic() + 30
        while b"submitit.local._local" not in Path(f"/proc/{controller.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child did not exec"  # until then it is pytest's copy
            time.sleep(0.01)
        assert local_state(str(controller.pid), RunDir(tmp_path)).state == "RUNNING"
        controller.kill()
        time.sleep(0.5)  # not reaped yet: a zombie
        assert local_state(str(controller.pid), RunDir(tmp_path)).state == "FAILED"
    finally:
        controller.kill()
        controller.wait()
    # a pid reused by another program is not the job
    assert local_state(str(os.getpid()), RunDir(tmp_path)).state == "FAILED"
    RunDir(tmp_path).final.mkdir()
    RunDir(tmp_path).finished_marker.write_text("{}")
    assert local_state(str(os.getpid()), RunDir(tmp_path)).state == "COMPLETED"


def test_local_executor_signals_before_its_time_limit(tmp_path: Path, tones_corpus: Path) -> None:
    """cluster.signal_delay_s reaches local jobs too: USR2 that long before the time limit, a checkpoint at
    the next step boundary, and the job ends unfinished (there is no SLURM to requeue it)."""
    done = submit(
        str(RECIPES / "smoke.yaml"),
        f"data.dir={tones_corpus}",
        f"data.cache_dir={tmp_path / 'c'}",
        "train.max_steps=5000",
        "eval.at_start=false",
        "cluster.time_min=1",
        "cluster.signal_delay_s=35",
        "--executor",
        "local",
        "--wait",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "smoke"
    stops = [r for r in read_run_logs(run_dir) if r.get("event") == "signal"]
    assert len(stops) == 1 and stops[0]["requeued"] is False, done.stdout + done.stderr
    newest_step, _ = checkpoint.list_checkpoints(run_dir / "checkpoints")[0]
    assert newest_step == stops[0]["step"]
    assert not RunDir(run_dir).is_finished() and not (run_dir / "final" / "model.safetensors").exists()


def test_auto_runs_locally_only_where_there_is_no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller that does not answer must not send a cluster's job to the login node."""
    import shutil
    import subprocess

    from asrlaunch.launcher import submission

    def slow_sinfo(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(command, 5)

    monkeypatch.setattr(subprocess, "run", slow_sinfo)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(submission.SubmitError, match="--executor local"):
        submission.choose_executor("auto")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert submission.choose_executor("auto") == "local"
