"""Preparing a corpus off the GPUs: with `cluster.prepare_partition` set, `asrlaunch submit` queues
`asrlaunch prepare` (data/prepare.py) as a CPU job on that partition, and the training job waits for it
(`--dependency=afterok:<id>`); when the cache already holds the corpus, no preparation job is queued. A failed
preparation leaves the training job to SLURM's dependency rules (pending, `DependencyNeverSatisfied`), and
`asrlaunch status` shows it with the preparation's error (RunDir.prepared); `submit --wait` ends there.
No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asrlaunch.core.recipe import Recipe
from asrlaunch.core.rundir import RunDir, SweepDir
from asrlaunch.data.prepare import is_prepared, job_local_variables
from asrlaunch.launcher.sweep import RunSpec, submitit_folder


def to_prepare(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs whose corpus is not in the cache yet, when the recipe asks for a preparation job (the job
    prepares each distinct corpus once, and tells every run of it). A `data.cache_dir` named by a job's own
    variable (`$SLURM_TMPDIR`) is no other job's: the training job's nodes prepare it."""
    return [
        spec
        for spec in specs
        if spec.recipe.cluster.prepare_partition is not None
        and not job_local_variables(spec.recipe)
        and not is_prepared(spec.recipe)
    ]


def preparation_parameters(recipe: Recipe) -> dict[str, Any]:
    """One CPU task on `cluster.prepare_partition`, no GPU, no requeue."""
    cluster = recipe.cluster
    params: dict[str, Any] = {
        "name": f"{recipe.run.name}-prepare",
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": cluster.prepare_cpus,
        "timeout_min": cluster.prepare_time_min,
        "slurm_partition": cluster.prepare_partition,
    }
    for key in ("account", "qos"):
        if getattr(cluster, key) is not None:
            params[f"slurm_{key}"] = getattr(cluster, key)
    return params


def submit_preparation(specs: Sequence[RunSpec]) -> str | None:
    """Queue the preparation job when a run needs one; its job id (None: nothing to prepare)."""
    wanted = to_prepare(specs)
    if not wanted:
        return None
    import submitit

    from asrlaunch.job.entry import PrepareJob

    executor = submitit.AutoExecutor(folder=submitit_folder(specs), cluster="slurm")
    executor.update_parameters(**preparation_parameters(wanted[0].recipe))
    job = executor.submit(PrepareJob(), [str(spec.run_dir.path.resolve()) for spec in wanted])
    return str(job.job_id)


def preparation_sbatch(specs: Sequence[RunSpec]) -> str | None:
    """The preparation job's sbatch script, as the dry run shows it (None: nothing to prepare)."""
    wanted = to_prepare(specs)
    if not wanted:
        return None
    from submitit.slurm.slurm import SlurmExecutor

    class Preview(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    folder: Path = submitit_folder(specs)
    executor = Preview(folder)
    generic = {k.removeprefix("slurm_"): v for k, v in preparation_parameters(wanted[0].recipe).items()}
    executor.update_parameters(**executor._convert_parameters(generic))
    return str(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))


def preparation_note(run_dir: RunDir, state: str) -> str:
    """What status says about a run's preparation job: running, or failed with its error."""
    outcome = run_dir.read_prepared()
    if outcome.get("ok") is False:
        return f"preparation failed ({state}): {outcome.get('error', '')}"
    if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        return f"preparing the corpus ({state}); training waits for it"
    if state not in ("COMPLETED", ""):
        where = run_dir.submitit if run_dir.submitit.exists() else SweepDir(run_dir.path.parent).submitit
        return f"preparation job {state}; see its output in {where}"
    return ""
