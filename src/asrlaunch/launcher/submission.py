"""Runs -> submitit jobs on SLURM (or local processes): executor choice, job parameters, the sbatch preview,
run directory creation and submission with rollback. Launcher side: no torch. Watching jobs is status.py's.

The batch script is submitit's: `#SBATCH` lines from the recipe's `cluster` section, then srun with one task
per device. Ours are its setup and teardown lines: the batch shell outlives stop signals, and after srun the
failover step (job/failover.py) decides whether a failed step is retried.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asrlaunch.core.exits import ExitCode
from asrlaunch.core.plan import StepPlan, plan_run
from asrlaunch.core.recipe import Recipe
from asrlaunch.core.rundir import RunDir, SweepDir
from asrlaunch.job.task import master_address_line
from asrlaunch.job.triage import STEP_MARKER
from asrlaunch.launcher.preparation import submit_preparation
from asrlaunch.launcher.sweep import RunSpec, submitit_folder

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
        if shutil.which("sinfo") is None:  # no SLURM here (a laptop): run on this machine
            return "local"
        if not slurm_available():  # a busy or down controller: never send a cluster's job to the login node
            raise SubmitError(
                "SLURM is installed here but its controller does not answer (sinfo failed or took over 5 s): "
                "retry, or choose --executor slurm (to see the error) or --executor local"
            )
        return "slurm"
    if requested == "slurm" and not slurm_available():
        raise SubmitError(
            "no SLURM controller answers (sinfo failed): start one with "
            "`bash slurm/cluster.sh start`, or use --executor local"
        )
    return requested


def batch_setup(run_dirs: Sequence[Path]) -> list[str]:
    """Before srun. Stop signals reach the batch shell too (`scancel --full`, `B:` signals, preemption's
    SIGTERM): bash's default would end it and take the step with it, so it traps them (the tasks act on them).
    Then a loop opens (closed in `batch_teardown`): each turn resolves the torch master's address for
    every task of the step, marks the step's start in the job's error output (triage reads srun's reports
    after it) and starts the supervisor beside srun."""
    python, dirs = shlex.quote(sys.executable), " ".join(shlex.quote(str(p.resolve())) for p in run_dirs)
    return [
        "trap : USR2 TERM",
        "asrlaunch_restarts=0",
        "while :; do",
        master_address_line(python),
        "asrlaunch_step_start=$(date +%s.%N)",
        f'echo "{STEP_MARKER} (restarts in this allocation: $asrlaunch_restarts)" >&2',
        f"{python} -m asrlaunch supervise --step-start $asrlaunch_step_start {dirs} &",
        "asrlaunch_supervisor=$!",
    ]


def batch_teardown(run_dirs: Sequence[Path]) -> list[str]:
    """After srun: the supervisor stops (USR1: its own signal, as stop signals reach it too), failover
    decides (job/failover.py); its exit status 75 runs srun again inside this allocation, anything else ends
    the loop, and the job ends with srun's exit status."""
    python, dirs = shlex.quote(sys.executable), " ".join(shlex.quote(str(p.resolve())) for p in run_dirs)
    return [
        "asrlaunch_status=$?",
        'kill -USR1 "$asrlaunch_supervisor" 2>/dev/null; wait "$asrlaunch_supervisor" 2>/dev/null',
        f"{python} -m asrlaunch failover --exit-status $asrlaunch_status --restarts $asrlaunch_restarts "
        f"--step-start $asrlaunch_step_start {dirs}",
        f"[ $? -eq {int(ExitCode.RESTART)} ] || break",
        "asrlaunch_restarts=$((asrlaunch_restarts + 1))",
        "done",
        "exit $asrlaunch_status",
    ]


def executor_parameters(
    recipe: Recipe, run_dirs: Sequence[Path] = (), after: str | None = None
) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for the recipe's `cluster` section: one task per device; a dead
    task ends the step (`--kill-on-bad-exit`), each task gets its CPUs, the job is requeueable (a lost node)
    and fails over; `after`: the preparation job it waits for (afterok)."""
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
    dependency = {"dependency": f"afterok:{after}"} if after else {}
    params["slurm_additional_parameters"] = {"requeue": True, **dependency, **cluster.extra_sbatch}
    # SLURM 22.05 to 23.02's srun does not inherit the job's --cpus-per-task: under task/affinity or
    # task/cgroup each rank would be pinned to one CPU while it runs cpus_per_task threads.
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster.cpus_per_task}"]
    if run_dirs:
        params["slurm_setup"] = batch_setup(run_dirs)
        params["slurm_teardown"] = batch_teardown(run_dirs)
    return params


def array_parallelism(recipe: Recipe, elements: int) -> int:
    """How many elements of a job array may run at once (`--array=0-N%K`)."""
    return recipe.cluster.array_parallelism or max(1, elements)


def make_executor(
    kind: str, folder: Path, recipe: Recipe, run_dirs: Sequence[Path] = (), after: str | None = None
) -> Any:
    import submitit

    executor: Any
    if kind == "local":
        # LocalExecutor itself: AutoExecutor refuses its signal_delay_s (USR2 before the time limit).
        executor = submitit.LocalExecutor(folder=folder)
        params = {k.removeprefix("slurm_"): v for k, v in executor_parameters(recipe).items()}
        params = {k: v for k, v in params.items() if k in LOCAL_PARAMETERS}
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = executor_parameters(recipe, run_dirs, after)
        params["slurm_array_parallelism"] = array_parallelism(recipe, len(run_dirs))
    executor.update_parameters(**params)
    return executor


def sbatch_text(recipe: Recipe, folder: Path, run_dirs: Sequence[Path], after: str | None = None) -> str:
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

    executor = Preview(folder)
    generic = {k.removeprefix("slurm_"): v for k, v in executor_parameters(recipe, run_dirs, after).items()}
    executor.update_parameters(
        **executor._convert_parameters(generic), array_parallelism=array_parallelism(recipe, len(run_dirs))
    )
    if len(run_dirs) > 1:
        executor.parameters["map_count"] = len(run_dirs)
    return str(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))


def plan_for(recipe: Recipe) -> StepPlan:
    """The plan of the recipe's job shape, before the data is read (`data.expected_train_size`)."""
    return plan_run(recipe, recipe.cluster.world_size)


# Where to set what the launcher writes itself, for an extra_sbatch option that would replace it.
OWNED_BY = {
    "nodes": "cluster.nodes",
    "ntasks-per-node": "cluster.gpus_per_node (or cluster.processes_per_node without GPUs)",
    "cpus-per-task": "cluster.cpus_per_task",
    "gpus-per-node": "cluster.gpus_per_node",
    "mem": "cluster.mem_gb",
    "time": "cluster.time_min",
    "signal": "cluster.signal_delay_s (the checkpoint before the time limit needs USR2)",
    "job-name": "run.name",
    "array": "--sweep and cluster.array_parallelism",
    "dependency": "cluster.prepare_partition",
}


# Options that would give each task one GPU, numbered 0 in it: DeepSpeed selects its device by LOCAL_RANK and
# would fail on every task but a node's first. Every task sees its node's GPUs and takes its own.
ONE_GPU_PER_TASK = ("gpus-per-task", "gpu-bind")


def replaced_options(recipe: Recipe) -> list[str]:
    """One line per `cluster.extra_sbatch` option that the launcher's own script sets already, or that would
    bind one GPU to each task: an extra may add options, not replace the job's shape, its signal, its logs or
    its requeue."""
    if not recipe.cluster.extra_sbatch:
        return []
    bare = recipe.model_copy(update={"cluster": recipe.cluster.model_copy(update={"extra_sbatch": {}})})
    script = sbatch_text(bare, Path("/preview"), [Path("/preview/a"), Path("/preview/b")])
    owned = set(re.findall(r"^#SBATCH --([\w-]+)", script, flags=re.MULTILINE))
    problems = []
    for key in recipe.cluster.extra_sbatch:
        option = key.replace("_", "-")
        if option in owned:
            fix = f"use {OWNED_BY[option]}" if option in OWNED_BY else "leave it out"
            problems.append(f"cluster.extra_sbatch.{key}: the launcher sets --{key} itself; {fix}")
        elif option in ONE_GPU_PER_TASK:
            problems.append(
                f"cluster.extra_sbatch.{key}: one GPU per task is not supported (DeepSpeed picks its device "
                "by LOCAL_RANK); every task sees its node's GPUs and takes its own: set cluster.gpus_per_node"
            )
    return problems


def place_problems(run_dir: RunDir, resume: bool) -> list[str]:
    """Why a run may not be written at `run_dir`: a run there already (without --resume), a finished one (with
    it: its job would have nothing to do), a sweep's runs there, or a run around it."""
    if run_dir.is_finished() and resume:
        return [
            f"{run_dir} finished already ({run_dir.final}): a resume continues a stopped run; to train on "
            f"from its model, start a new run with model.name_or_path={run_dir.final}"
        ]
    if run_dir.is_run() and not resume:
        return [
            f"{run_dir} holds a run already: pick another run.name (run.name=...), or continue it with "
            "--resume"
        ]
    if SweepDir(run_dir.path).elements():
        return [f"{run_dir} holds a sweep's runs: pick another run.name (run.name=...)"]
    if RunDir(run_dir.path.parent).is_run():
        return [f"{run_dir.path.parent} is a run, not a sweep's folder: pick another run.name (run.name=...)"]
    return []


def check_submittable(specs: Sequence[RunSpec], resume: bool) -> None:
    """Everything a submission refuses, all at once, before anything is written (a dry run refuses the same).
    An impossible batch split raises BatchPlanError."""
    problems = replaced_options(specs[0].recipe) if specs else []  # cluster.* is one for all elements
    for spec in specs:
        plan_for(spec.recipe)
        problems += place_problems(spec.run_dir, resume)
    if problems:
        raise SubmitError("\n".join(problems))


def submit(specs: Sequence[RunSpec], kind: str, resume: bool = False) -> list[tuple[RunSpec, str]]:
    """Submit the runs: one job, or one job array for a sweep. Returns (run, job id) pairs.

    Everything is checked before the first directory is written; if the submission itself fails, the
    directories it created are removed again and a resumed run gets its recipe and plan back, so the same
    command can simply be repeated.
    """
    from asrlaunch.job.entry import TrainJob

    check_submittable(specs, resume)
    plans = [plan_for(spec.recipe) for spec in specs]
    created = [spec.run_dir.path for spec in specs if not spec.run_dir.path.exists()]
    kept = {
        path: path.read_bytes() for s in specs for path in (s.run_dir.recipe, s.run_dir.plan) if path.exists()
    }
    prepared: list[tuple[RunSpec, str]] = []
    try:
        for spec, plan in zip(specs, plans, strict=True):
            spec.run_dir.create(spec.recipe.to_yaml(), plan.to_dict())
        after = submit_preparation(specs) if kind == "slurm" else None
        if after:
            prepared = [(spec, after) for spec in specs]
        executor = make_executor(
            kind, submitit_folder(specs), specs[0].recipe, [s.run_dir.path for s in specs], after
        )
        run_dirs = [str(spec.run_dir.path.resolve()) for spec in specs]
        jobs = (
            executor.map_array(TrainJob(), run_dirs)
            if len(specs) > 1
            else [executor.submit(TrainJob(), run_dirs[0])]
        )
    except Exception as error:
        for _, job_id in prepared[:1]:  # its training job was never queued
            subprocess.run(["scancel", job_id], capture_output=True)
        for run_dir in created:
            shutil.rmtree(run_dir, ignore_errors=True)
        for path, content in kept.items():
            path.write_bytes(content)
        raise SubmitError(
            f"submission failed ({type(error).__name__}: {error}); nothing was submitted"
        ) from error
    for spec, job_id in prepared:
        spec.run_dir.record_job(
            {"job_id": job_id, "executor": kind, "submitted": time.time(), "role": "prepare"}
        )
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
