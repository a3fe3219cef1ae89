"""Runs -> submitit jobs on SLURM (or local processes): executor choice, job parameters, the sbatch preview,
run directory creation and submission with rollback. Launcher side: no torch. Watching jobs is status.py's.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asrlaunch.plan import StepPlan, plan_batch, plan_steps
from asrlaunch.recipe import Recipe, RecipeError
from asrlaunch.sweep import RunSpec, submitit_folder

EXECUTORS = ("auto", "slurm", "local")
LOCAL_PARAMETERS = ("name", "nodes", "timeout_min", "tasks_per_node", "gpus_per_node", "signal_delay_s")


class SubmitError(RuntimeError):
    """The submission cannot go ahead as asked (executor, run directory, sweep)."""


def slurm_available() -> bool:
    """True when a SLURM controller answers (sinfo returns within a few seconds)."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def choose_executor(requested: str) -> str:
    if requested not in EXECUTORS:
        raise SubmitError(f"executor {requested!r} is not one of {', '.join(EXECUTORS)}")
    if requested == "auto":
        return "slurm" if slurm_available() else "local"
    if requested == "slurm" and not slurm_available():
        raise SubmitError(
            "no SLURM controller answers (sinfo failed): start one with "
            "`bash slurm/cluster.sh start`, or use --executor local"
        )
    return requested


def plan_for(recipe: Recipe, train_samples: int | None = None) -> StepPlan:
    """The batch and step plan for the recipe's cluster shape, without reading the data."""
    batch = plan_batch(
        recipe.train.global_batch_size, recipe.cluster.world_size, recipe.train.max_micro_batch_size
    )
    known = [n for n in (recipe.data.expected_train_size, recipe.data.max_train_samples) if n is not None]
    samples = train_samples or (min(known) if known else None)
    if samples is None:
        raise RecipeError("data.expected_train_size: set it (TIMIT: 4620) so the launcher can plan the steps")
    return plan_steps(batch, samples, recipe.train.epochs, recipe.train.warmup_steps, recipe.train.max_steps)


# Stop signals reach the batch shell too (`scancel --full`, `B:` signals, preemption's SIGTERM); bash's
# default action would end it and take the job step with it. The tasks act on them; the shell outlives them.
BATCH_SHELL_SETUP = ["trap : USR2 TERM"]


def failover_teardown(run_dirs: Sequence[Path]) -> list[str]:
    """After srun: a failed step is requeued within cluster.max_failures (failover.py); $? is srun's exit."""
    dirs = " ".join(shlex.quote(str(path.resolve())) for path in run_dirs)
    return [f"{shlex.quote(sys.executable)} -m asrlaunch.failover --exit-status $? {dirs}"]


def executor_parameters(recipe: Recipe, run_dirs: Sequence[Path] = ()) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for the recipe's `cluster` section: one task per device; a dead
    task ends the step (`--kill-on-bad-exit`), the job is requeueable (a lost node) and fails over."""
    cluster = recipe.cluster
    params: dict[str, Any] = {
        "name": recipe.run.name,
        "nodes": cluster.nodes,
        "tasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "timeout_min": cluster.time_min,
        "slurm_signal_delay_s": cluster.signal_delay_s,
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb is not None:
        params["mem_gb"] = cluster.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key) is not None:
            params[f"slurm_{key}"] = getattr(cluster, key)
    params["slurm_additional_parameters"] = {"requeue": True, **cluster.extra_sbatch}
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    params["slurm_setup"] = list(BATCH_SHELL_SETUP)
    if run_dirs:
        params["slurm_teardown"] = failover_teardown(run_dirs)
    return params


def make_executor(kind: str, folder: Path, recipe: Recipe, run_dirs: Sequence[Path] = ()) -> Any:
    import submitit

    executor: Any
    if kind == "local":
        # LocalExecutor itself: AutoExecutor refuses its signal_delay_s (USR2 before the time limit).
        executor = submitit.LocalExecutor(folder=folder)
        params = {k.removeprefix("slurm_"): v for k, v in executor_parameters(recipe).items()}
        params = {k: v for k, v in params.items() if k in LOCAL_PARAMETERS}
    else:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=recipe.cluster.max_requeues
        )
        params = executor_parameters(recipe, run_dirs)
        params["slurm_array_parallelism"] = max(1, len(run_dirs))
    executor.update_parameters(**params)
    return executor


def sbatch_text(recipe: Recipe, folder: Path, run_dirs: Sequence[Path]) -> str:
    """The exact sbatch script submitit would submit for this recipe (the dry run shows it).

    submitit has no public API for this: we use its SlurmExecutor's `_convert_parameters`,
    `_make_submission_file_text` and `_submitit_command_str`, and override `affinity` (which asks srun) so
    a dry run works off the cluster too. These are private members; pyproject pins submitit below its next
    minor release, and tests/golden/timit32_2x4.sbatch catches a change of their output.
    """
    from submitit.slurm.slurm import SlurmExecutor

    class Preview(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    executor = Preview(folder, max_num_timeout=recipe.cluster.max_requeues)
    generic = {k.removeprefix("slurm_"): v for k, v in executor_parameters(recipe, run_dirs).items()}
    executor.update_parameters(
        **executor._convert_parameters(generic), array_parallelism=max(1, len(run_dirs))
    )
    if len(run_dirs) > 1:
        executor.parameters["map_count"] = len(run_dirs)
    return str(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))


def prepare_run_dir(spec: RunSpec, plan: StepPlan) -> None:
    """Create the run directory with the resolved recipe and plan (submit() checked it is free)."""
    spec.run_dir.create()
    spec.run_dir.write_recipe(spec.recipe.to_yaml())
    spec.run_dir.write_plan(plan.to_dict())


def submit(specs: Sequence[RunSpec], kind: str, resume: bool = False) -> list[tuple[RunSpec, str]]:
    """Submit the runs: one job, or one job array for a sweep. Returns (run, job id) pairs.

    Everything is checked before the first directory is written; if the submission itself fails, the
    directories it created are removed again, so the same command can simply be repeated.
    """
    from asrlaunch.job import TrainJob

    plans = [plan_for(spec.recipe) for spec in specs]
    for spec in specs:
        if spec.run_dir.is_run() and not resume:
            raise SubmitError(
                f"{spec.run_dir} holds a run already: pick another run.name (run.name=...), "
                "or continue it with --resume"
            )
    created = [spec.run_dir.path for spec in specs if not spec.run_dir.path.exists()]
    try:
        for spec, plan in zip(specs, plans, strict=True):
            prepare_run_dir(spec, plan)
        executor = make_executor(
            kind, submitit_folder(specs), specs[0].recipe, [s.run_dir.path for s in specs]
        )
        run_dirs = [str(spec.run_dir.path.resolve()) for spec in specs]
        jobs = (
            executor.map_array(TrainJob(), run_dirs)
            if len(specs) > 1
            else [executor.submit(TrainJob(), run_dirs[0])]
        )
    except Exception as error:
        for run_dir in created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SubmitError(
            f"submission failed ({type(error).__name__}: {error}); nothing was submitted"
        ) from error
    for spec, job in zip(specs, jobs, strict=True):
        spec.run_dir.record_job(
            {
                "job_id": str(job.job_id),
                "executor": kind,
                "submitted": time.time(),
                "overrides": list(spec.overrides),
            }
        )
    return [(spec, str(job.job_id)) for spec, job in zip(specs, jobs, strict=True)]
