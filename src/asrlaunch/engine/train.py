"""The worker: one process per device, under srun, torchrun, accelerate launch or alone.

    asrlaunch train RECIPE --run-dir DIR [key=value ...]
    torchrun --standalone --nproc_per_node 2 -m asrlaunch train RECIPE --run-dir DIR

Every start resumes from the newest complete checkpoint of the run directory; a finished run exits at once.
A run directory that holds no run yet gets its recipe and plan (core/rundir.py); one that does must be given a
recipe that only changes what a resume may change. Exit status (core/exits.py): 0 trained to the end (or
finished already); 1 training failed (diverged, requeue limit, a checkpoint that could not be written); 2 the
user's input is wrong (recipe, data, batch plan): one `error:` line says what to fix; 3 stopped by a signal
after saving a checkpoint. A failure is also logged as an `error` event when a retry cannot help, `crash` when
it may, which the job's failover step reads (job/failover.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from asrlaunch.core import gc_policy
from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.core.history import RunHistory
from asrlaunch.core.logs import RankLog
from asrlaunch.core.plan import BatchPlanError, plan_run
from asrlaunch.core.recipe import Recipe, RecipeError, load_recipe
from asrlaunch.core.records import Event
from asrlaunch.core.resume import check_resume
from asrlaunch.core.rundir import RunDir
from asrlaunch.data.corpus import DataError
from asrlaunch.engine.checkpoint import CheckpointWriteError
from asrlaunch.engine.faults import FaultSpecError
from asrlaunch.engine.output import route_library_output
from asrlaunch.engine.runtime import adopt_thread_limit
from asrlaunch.engine.state import TrainingDivergedError
from asrlaunch.engine.trainer import Trainer
from asrlaunch.job.heartbeat import Heartbeat
from asrlaunch.job.signals import JobInterrupted, StopRequest, answer_stack_requests
from asrlaunch.job.task import SlurmTask, adopt_launcher_environment


class RequeueLimitError(RuntimeError):
    """The job was restarted more often than cluster.max_requeues allows."""


USER_ERRORS = (RecipeError, DataError, BatchPlanError, FaultSpecError)
# Errors a retry cannot fix: the job stops with its one line, and failover does not retry it.
FINAL_ERRORS = (*USER_ERRORS, TrainingDivergedError, RequeueLimitError, CheckpointWriteError)


def process_started() -> float:
    """Unix time this process started (from /proc; now, where there is none): start-up is counted from it."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def record_error(
    run_dir: RunDir, trainer: Trainer | None, problem: BaseException, task: SlurmTask, started: float
) -> None:
    """Log what ended this rank (best effort: the disk may be what failed), with when its process started: an
    attempt that ends before its start record (a corpus that failed to prepare) still counts its time."""
    rank = int(os.environ.get("RANK", "0"))
    attempt = (
        trainer.log.attempt
        if trainer is not None
        else RunHistory.read(run_dir).next_attempt(task.restart_count)
    )
    step = trainer.step_reached if trainer is not None else 0
    final = isinstance(problem, FINAL_ERRORS)
    message = f"{type(problem).__name__}: {problem}".splitlines()[0][:500]
    try:
        with RankLog(run_dir, rank, attempt=attempt) as log:
            kind = Event.ERROR if final else Event.CRASH
            log.event(kind, step, 0.0, error=message, retry=not final, process_started=round(started, 3))
    except OSError:
        pass


def adopt_run_dir(recipe: Recipe, run_dir: RunDir) -> None:
    """A new run directory gets its recipe and plan; an existing run is continued only with its own recipe
    (up to what a resume may change)."""
    if run_dir.is_run():
        # read as the new recipe is (its paths from this directory): a run that recorded a relative data.dir,
        # before paths were resolved at submission, is the same run here
        stored = load_recipe(run_dir.recipe)
        check_resume(stored, recipe)
        if stored == recipe:
            return
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.create(recipe.to_yaml(), plan_run(recipe, int(os.environ.get("WORLD_SIZE", "1"))).to_dict())


def run_training(recipe: Recipe, run_dir: RunDir, stop: StopRequest | None = None) -> None:
    """Train one rank of a run (the caller's process is one task of the world). `stop`: the caller's, when
    it installed one before its imports."""
    started = process_started()
    adopt_launcher_environment()
    adopt_thread_limit()
    if run_dir.is_finished():
        print(f"{run_dir} finished already ({run_dir.final}); nothing to train", flush=True)
        return
    stop = StopRequest() if stop is None else stop  # (an unsignalled StopRequest is falsy)
    stop.install()  # a stop signal during start-up is a stop too
    task = SlurmTask.from_environ()
    heartbeat = Heartbeat(run_dir, int(os.environ.get("RANK", "0")), started).start()
    answer_stack_requests(run_dir, heartbeat.rank)
    route_library_output(run_dir, heartbeat.rank, recipe.logging.verbose)
    trainer = None
    try:
        if not task.within_requeue_budget(recipe.cluster.max_requeues):
            raise RequeueLimitError(
                f"restarted {task.restart_count} times, more than cluster.max_requeues="
                f"{recipe.cluster.max_requeues}; resubmit with `asrlaunch submit --resume {run_dir}`"
            )
        trainer = Trainer(recipe, run_dir, stop, task, heartbeat)
        gc_policy.started()
        trainer.run()
    except JobInterrupted:
        raise
    except Exception as problem:
        record_error(run_dir, trainer, problem, task, started)
        raise
    finally:
        heartbeat.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="asrlaunch train", description=__doc__, formatter_class=formatter)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", required=True, help="run directory (logs/, checkpoints/, final/ ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clean_warnings()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = RunDir(Path(args.run_dir))
        adopt_run_dir(recipe, run_dir)
        run_training(recipe, run_dir)
    except JobInterrupted as stopped:
        print(str(stopped), file=sys.stderr, flush=True)
        return ExitCode.STOPPED
    except USER_ERRORS as problem:
        error(problem)
        return ExitCode.USAGE
    except (TrainingDivergedError, RequeueLimitError, CheckpointWriteError) as problem:
        error(problem)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
