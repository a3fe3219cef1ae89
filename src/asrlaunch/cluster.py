"""Recipe -> run directories -> submitit jobs on SLURM (or local processes). Launcher side: no torch.

A run directory holds everything about one run: the resolved recipe, the batch plan, submitit's folder
(pickles, sbatch script, per-task stdout/stderr), logs/, checkpoints/, final/ and job.json (how to find
its job). A sweep is one SLURM job array; each element is a run of its own under <output_root>/<sweep>/.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.plan import StepPlan, plan_batch, plan_steps
from asrlaunch.recipe import Recipe, RecipeError, merge, parse_overrides, qualify_key, recipe_from_dict

EXECUTORS = ("auto", "slurm", "local")
LOCAL_PARAMETERS = ("name", "nodes", "timeout_min", "tasks_per_node", "gpus_per_node", "signal_delay_s")


class SubmitError(RuntimeError):
    """The submission cannot go ahead as asked (executor, run directory, sweep)."""


@dataclass(frozen=True)
class RunSpec:
    """One run to submit: its resolved recipe, the overrides that made it, and its directory."""

    recipe: Recipe
    overrides: tuple[str, ...]
    run_dir: Path


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


def expand_sweep(sweeps: Sequence[str]) -> list[tuple[str, ...]]:
    """`--sweep train.lr=1e-4,3e-4 --sweep train.seed=1,2` -> the cross product of override tuples."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise RecipeError(f"sweep {sweep!r} must look like section.key=v1,v2 (e.g. train.lr=1e-4,3e-4)")
        key = qualify_key(key)
        if key.startswith(("cluster.", "run.")):
            raise RecipeError(
                f"sweep over {key}: the elements of a job array share one job shape and one "
                "sweep root; submit separate runs instead"
            )
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [tuple(combo) for combo in itertools.product(*axes)] if axes else [()]


def element_name(overrides: Sequence[str]) -> str:
    """A directory name for one sweep element: `lr=0.0003_seed=2`; other characters become `-`."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.split('.')[-1]}={value}")
    name = "_".join(parts) or "run"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", name)


def resolve_runs(
    base: dict[str, Any], source: str, overrides: Sequence[str], sweeps: Sequence[str]
) -> list[RunSpec]:
    """Every run of a submission, validated before anything is written or submitted."""
    common = merge(base, parse_overrides(overrides))
    specs = []
    for element in expand_sweep(sweeps):
        recipe = recipe_from_dict(merge(common, parse_overrides(element)), source)
        root = Path(recipe.run.output_root) / recipe.run.name
        run_dir = root / element_name(element) if sweeps else root
        specs.append(RunSpec(recipe, (*overrides, *element), run_dir))
    names = [spec.run_dir for spec in specs]
    if len(set(names)) != len(names):
        raise RecipeError(
            f"sweep elements share a directory name ({', '.join(map(str, names))}): "
            "use values that differ in more than punctuation"
        )
    return specs


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


def executor_parameters(recipe: Recipe) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for the recipe's `cluster` section: one task per device."""
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
    extra = dict(cluster.extra_sbatch)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def make_executor(kind: str, folder: Path, recipe: Recipe, array_size: int = 1) -> Any:
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
        params = executor_parameters(recipe)
        params["slurm_array_parallelism"] = max(1, array_size)
    executor.update_parameters(**params)
    return executor


def sbatch_text(recipe: Recipe, folder: Path, array_size: int = 1) -> str:
    """The exact sbatch script submitit would submit for this recipe (the dry-run shows it).

    Rendered by submitit's own SlurmExecutor, told that srun exists, so a dry run works off the cluster too.
    """
    from submitit.slurm.slurm import SlurmExecutor

    class Preview(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    executor = Preview(folder, max_num_timeout=recipe.cluster.max_requeues)
    generic = {k.removeprefix("slurm_"): v for k, v in executor_parameters(recipe).items()}
    executor.update_parameters(**executor._convert_parameters(generic), array_parallelism=max(1, array_size))
    if array_size > 1:
        executor.parameters["map_count"] = array_size
    return str(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))


def prepare_run_dir(spec: RunSpec, plan: StepPlan) -> None:
    """Create the run directory with the resolved recipe and plan (submit() checked it is free)."""
    recipe_file = spec.run_dir / "recipe.yaml"
    for sub in ("logs", "checkpoints", "submitit"):
        (spec.run_dir / sub).mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(spec.recipe.to_yaml())
    (spec.run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1) + "\n")


def record_job(run_dir: Path, job_id: str, executor: str, overrides: Sequence[str]) -> None:
    """Append the job to <run_dir>/job.json (a run keeps every job that worked on it)."""
    path = run_dir / "job.json"
    history = json.loads(path.read_text())["jobs"] if path.exists() else []
    history.append(
        {"job_id": job_id, "executor": executor, "submitted": time.time(), "overrides": list(overrides)}
    )
    path.write_text(json.dumps({"jobs": history}, indent=1) + "\n")


def submit(specs: Sequence[RunSpec], kind: str, resume: bool = False) -> list[tuple[RunSpec, str]]:
    """Submit the runs: one job, or one job array for a sweep. Returns (run, job id) pairs.

    Everything is checked before the first directory is written; if the submission itself fails, the
    directories it created are removed again, so the same command can simply be repeated.
    """
    from asrlaunch.job import TrainJob

    plans = [plan_for(spec.recipe) for spec in specs]
    for spec in specs:
        if (spec.run_dir / "recipe.yaml").exists() and not resume:
            raise SubmitError(
                f"{spec.run_dir} holds a run already: pick another run.name (run.name=...), "
                "or continue it with --resume"
            )
    created = [spec.run_dir for spec in specs if not spec.run_dir.exists()]
    try:
        for spec, plan in zip(specs, plans, strict=True):
            prepare_run_dir(spec, plan)
        executor = make_executor(kind, submitit_folder(specs), specs[0].recipe, len(specs))
        run_dirs = [str(spec.run_dir.resolve()) for spec in specs]
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
        record_job(spec.run_dir, str(job.job_id), kind, spec.overrides)
    return [(spec, str(job.job_id)) for spec, job in zip(specs, jobs, strict=True)]


def submitit_folder(specs: Sequence[RunSpec]) -> Path:
    """submitit's folder: in the run directory, or for a sweep in the sweep's root (one array, one folder)."""
    return specs[0].run_dir / "submitit" if len(specs) == 1 else specs[0].run_dir.parent / "submitit"


def wait_for(submitted: Sequence[tuple[RunSpec, str]], kind: str, poll_s: float = 2.0) -> int:
    """Block until every job has ended; print each run's state and where its results are."""
    from asrlaunch.status import TERMINAL, collect_status

    run_dirs = [spec.run_dir for spec, _ in submitted]
    unknown_polls = 0
    while True:
        statuses = collect_status(run_dirs)
        if all(s.job.state in TERMINAL for s in statuses):
            break
        # A job the scheduler no longer knows (purged, no accounting) will not come back.
        unknown_polls = unknown_polls + 1 if any(s.job.state == "UNKNOWN" for s in statuses) else 0
        if unknown_polls * poll_s > 60:
            break
        time.sleep(poll_s)
    for status in statuses:
        wer = f", final WER {status.wer:.4f}" if status.wer is not None else ""
        print(f"{status.job.state}: {status.run_dir}{wer}")
        print(
            f"  model: {status.run_dir / 'final'}   logs: {status.run_dir / 'logs'}   "
            f"job output: {status.run_dir / 'submitit'}"
        )
    return 0 if all(s.job.state == "COMPLETED" for s in statuses) else 1
