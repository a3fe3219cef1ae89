"""Experiment trackers through accelerate's tracking API: `logging.report_to` (tensorboard, the
default; mlflow; wandb; none). Rank 0 writes, under <run_dir>/tracking/: train loss, lr, grad norm and
samples/s every logging window, eval loss and WER at every evaluation, the recipe as hyperparameters.

A resumed attempt continues the same tracked run: TensorBoard's writer is opened with `purge_step` at the
first step the attempt logs, so the events an earlier attempt logged past it (the steps now replayed) are
dropped by TensorBoard's reader; MLflow continues the same run id (kept in tracking/mlflow_run_id), where
replayed steps add points rather than replace them, and W&B the same run id (a random one, kept in
tracking/wandb_run_id: a new run at the same path is another run), whose steps only increase: it keeps the
points an earlier attempt logged past the resume step and drops the replayed ones (the collector's table and
TensorBoard hold what was trained last). The hyperparameters are the recipe without what a
resume may change (core/resume.py): MLflow refuses a parameter a later attempt would log with another value.
Which trackers a recipe names is the recipe's (`LoggingSection.trackers`); which package each needs is
preflight's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asrlaunch.core.recipe import Recipe
from asrlaunch.core.resume import kept_on_resume
from asrlaunch.core.rundir import RunDir


def hyperparameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe as dotted keys with scalar values (what every tracker's hyperparameter table accepts),
    without what a resume may change."""
    return kept_on_resume(values, tracker_value)


def tracker_value(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str) else str(value)


def init_kwargs(recipe: Recipe, run_dir: RunDir, start_step: int) -> dict[str, dict[str, Any]]:
    kwargs: dict[str, dict[str, Any]] = {}
    names = recipe.logging.trackers
    if "tensorboard" in names:  # from the first step this attempt logs (a restart from 0 included)
        kwargs["tensorboard"] = {"purge_step": start_step + 1}
    if "mlflow" in names:
        stored = run_dir.tracking / "mlflow_run_id"
        kwargs["mlflow"] = (
            {"run_id": stored.read_text().strip()} if stored.exists() else {"run_name": run_dir.path.name}
        )
    if "wandb" in names:
        kwargs["wandb"] = {
            "dir": str(run_dir.tracking),
            "id": kept_id(run_dir.tracking / "wandb_run_id"),
            "resume": "allow",
            "name": run_dir.path.name,
        }
    return kwargs


def kept_id(path: Path) -> str:
    """The run's id for a tracker, made at its first start and kept in the run directory."""
    if path.exists():
        return path.read_text().strip()
    made = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(made + "\n")
    return made


class Tracking:
    """Opens the recipe's trackers at a start (rank 0) and logs records to them."""

    def __init__(self, accelerator: Any, recipe: Recipe, run_dir: RunDir, start_step: int) -> None:
        self.accelerator, self.enabled = accelerator, bool(recipe.logging.trackers)
        if not self.enabled:
            return
        if accelerator.is_main_process:
            run_dir.tracking.mkdir(parents=True, exist_ok=True)
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store in the run directory
                os.environ["MLFLOW_TRACKING_URI"] = (run_dir.tracking / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
        config = hyperparameters(recipe.to_dict())
        main = accelerator.is_main_process  # the others open no tracker
        kwargs = init_kwargs(recipe, run_dir, start_step) if main else {}
        accelerator.init_trackers(recipe.run.name, config=config, init_kwargs=kwargs)
        stored = run_dir.tracking / "mlflow_run_id"
        if accelerator.is_main_process and "mlflow" in recipe.logging.trackers and not stored.exists():
            stored.write_text(accelerator.get_tracker("mlflow", unwrap=True).info.run_id + "\n")

    def log(self, values: Mapping[str, float | None], step: int) -> None:
        if self.enabled:
            self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.enabled:
            self.accelerator.end_training()
            self.enabled = False
