"""What a submitit task runs: one rank of a run, read from its run directory.

Pickled by the launcher (which must not import torch), so torch is imported only when the job runs. Requeues
are ours, not submitit's: at a stop signal the trainer saves a checkpoint and rank 0 requeues the job within
the requeue budget (job/task.py); after a failed step the batch script's failover decides (job/failover.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from asrlaunch.core.rundir import RunDir
from asrlaunch.job.signals import JobInterrupted, StopRequest, answer_stack_requests
from asrlaunch.job.task import adopt_launcher_environment, task_rank


class PrepareJob:
    """Calling it with run directories prepares their corpora and fetches their models (a CPU job that the
    training job waits for); what happened is written to each run's prepare.json."""

    def __call__(self, run_dirs: list[str]) -> list[str]:
        from asrlaunch.core.recipe import load_run_recipe
        from asrlaunch.data.prepare import ensure_corpus, fetch_model, prepare_corpus

        runs = [RunDir(Path(path)) for path in run_dirs]
        done: dict[str, dict[str, object]] = {}  # one preparation per distinct corpus and model
        told: list[RunDir] = []
        try:
            for run_dir in runs:
                recipe = load_run_recipe(run_dir.recipe)
                key = repr((recipe.data, recipe.model))
                if key not in done:
                    ensure_corpus(recipe, is_main=True)
                    corpus = prepare_corpus(recipe)
                    model = fetch_model(recipe.model)
                    how = "hit" if corpus.cache_hit else "built"
                    done[key] = {"ok": True, "cache": how, "skipped": corpus.skipped, "model": model}
                    print(f"prepared {recipe.data.dir}: cache {how}; {model}", flush=True)
                run_dir.write_prepared(done[key])
                told.append(run_dir)
        except Exception as problem:  # the whole job fails, and every run waiting on it is told why
            failed = {"ok": False, "error": f"{type(problem).__name__}: {problem}"}
            for run_dir in runs:
                if run_dir not in told:
                    run_dir.write_prepared(failed)
            raise
        return run_dirs


class TrainJob:
    """Calling it with a run directory trains that run's recipe."""

    def __call__(self, run_dir: str) -> str:
        run = RunDir(Path(run_dir))
        answer_stack_requests(run, task_rank())  # before anything that can hang: the controller, the imports
        # Ours before the imports (seconds; minutes on a cold shared file system): submitit's handlers would
        # ignore a SIGTERM and, on USR2, requeue from rank 0 mid-import, outside the requeue budget.
        stop = StopRequest()
        stop.install()
        adopt_launcher_environment()

        from asrlaunch.core.recipe import load_run_recipe
        from asrlaunch.engine.train import run_training

        try:
            run_training(load_run_recipe(run.recipe), run, stop)
        except JobInterrupted as stopped:
            print(str(stopped), file=sys.stderr, flush=True)
            if not stopped.requeued:
                raise
            # Requeued: SLURM ends this task now. Returning normally could let the step end as COMPLETED.
            time.sleep(300)
            raise
        return run_dir
