"""What a submitit task runs: one rank of a run, read from its run directory.

Pickled by the launcher (which must not import torch), so torch is imported only when the job runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import submitit

from asrlaunch.signals import JobInterrupted


class TrainJob(submitit.helpers.Checkpointable):
    """Calling it with a run directory trains that run's recipe; submitit requeues it on preemption."""

    def __call__(self, run_dir: str) -> str:
        from asrlaunch.recipe import load_recipe
        from asrlaunch.train import run_training

        path = Path(run_dir)
        try:
            run_training(load_recipe(path / "recipe.yaml"), path)
        except JobInterrupted as stopped:
            print(str(stopped), file=sys.stderr, flush=True)
            if not stopped.requeued:
                raise
            # Requeued: SLURM ends this task now. Returning normally could let the step end as COMPLETED.
            time.sleep(300)
            raise
        return run_dir
