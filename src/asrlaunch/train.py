"""The worker: one process per device, under torchrun, srun, accelerate launch or alone.

    python -m asrlaunch.train RECIPE --run-dir DIR [key=value ...]

Every start resumes from the newest complete checkpoint of the run directory; a finished run exits at once.
Exit status: 0 trained to the end (or finished already); 1 training failed (diverged, requeue limit, a
checkpoint that could not be written); 2 the user's input is wrong (recipe, data, batch plan): one `error:`
line says what to fix; 3 stopped by a signal after saving a checkpoint (requeued, or to be continued with
`submit.py --resume`). A failure is also logged as a `meta` record (`event: error` when a retry cannot help,
`crash` when it may), which the job's failover step reads (failover.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from asrlaunch.checkpoint import CheckpointWriteError
from asrlaunch.cli import clean_warnings, error
from asrlaunch.data.timit import DataError
from asrlaunch.distenv import adopt_launcher_environment
from asrlaunch.faults import FaultSpecError
from asrlaunch.logs import RankLog, next_attempt, slurm_restart_count
from asrlaunch.plan import BatchPlanError
from asrlaunch.recipe import Recipe, RecipeError, load_recipe
from asrlaunch.rundir import RunDir
from asrlaunch.runtime import adopt_thread_limit
from asrlaunch.signals import JobInterrupted, StopRequest
from asrlaunch.trainer import RequeueLimitError, Trainer, TrainingDivergedError

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 0, 1, 2, 3
# Errors a retry cannot fix: the job stops with its one line, and failover does not requeue it.
FINAL_ERRORS = (
    RecipeError,
    DataError,
    BatchPlanError,
    FaultSpecError,
    TrainingDivergedError,
    RequeueLimitError,
    CheckpointWriteError,
)


def record_error(run_dir: RunDir, trainer: Trainer | None, problem: BaseException) -> None:
    """Log what ended this rank (best effort: the disk may be what failed)."""
    rank = int(os.environ.get("RANK", "0"))
    attempt = trainer.log.attempt if trainer is not None else next_attempt(run_dir)
    step = trainer.step_reached if trainer is not None else 0
    final = isinstance(problem, FINAL_ERRORS)
    message = f"{type(problem).__name__}: {problem}".splitlines()[0][:500]
    try:
        with RankLog(run_dir, rank, attempt=attempt) as log:
            log.write("meta", step, 0.0, event="error" if final else "crash", error=message, retry=not final)
    except OSError:
        pass


def check_requeue_budget(recipe: Recipe, run_dir: RunDir) -> None:
    restarts = slurm_restart_count()
    if restarts > recipe.cluster.max_requeues:
        raise RequeueLimitError(
            f"restarted {restarts} times, more than cluster.max_requeues="
            f"{recipe.cluster.max_requeues}; resubmit with launch/submit.py --resume {run_dir}"
        )


def run_training(recipe: Recipe, run_dir: RunDir) -> None:
    """Train one rank of a run (the caller's process is one task of the world)."""
    adopt_launcher_environment()
    adopt_thread_limit()
    if run_dir.is_finished():
        print(f"{run_dir} finished already ({run_dir.final}); nothing to train", flush=True)
        return
    stop = StopRequest()
    stop.install()  # a stop signal during start-up is a stop too
    trainer = None
    try:
        check_requeue_budget(recipe, run_dir)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(recipe, run_dir, stop)
        trainer.run()
    except JobInterrupted:
        raise
    except Exception as problem:
        record_error(run_dir, trainer, problem)
        raise


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", required=True, help="run directory (logs/, checkpoints/, final/ ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clean_warnings()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run_training(recipe, RunDir(Path(args.run_dir)))
    except JobInterrupted as stopped:
        print(str(stopped), file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except (RecipeError, DataError, BatchPlanError, FaultSpecError) as problem:  # the user's input
        error(problem)
        return EXIT_USER_ERROR
    except (TrainingDivergedError, RequeueLimitError, CheckpointWriteError) as problem:
        error(problem)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
