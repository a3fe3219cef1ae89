"""The rule of what a resume may change: one list, checked by `asrlaunch submit --resume` before anything is
queued, by every trainer start, and by the collector before it merges attempts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from asrlaunch.core.recipe import Recipe, RecipeError

# What a resume may change without making it another run: the job shape, how often it logs, evaluates and
# saves, when it stops, how it is distributed within its backend (a DDP checkpoint is not a DeepSpeed one).
# Everything else (model, data, optimisation, seed, run name, backend) must stay, so that a resumed run is
# the run it continues, and two elements of a sweep are never merged.
MAY_CHANGE_ON_RESUME = (
    "cluster",
    "logging",
    "eval",
    "checkpoint",
    "data.cache_dir",
    "data.skip_bad",
    "train.max_steps",
    "train.zero_stage",
    "train.max_micro_batch_size",
    "train.collective_timeout_s",
    "train.hang_timeout_s",
    "train.startup_timeout_s",
)


def may_change_on_resume(key: str) -> bool:
    """Whether a dotted recipe key (`cluster.time_min`) is one a resume may change."""
    return any(key == name or key.startswith(f"{name}.") for name in MAY_CHANGE_ON_RESUME)


def kept_on_resume(
    values: Mapping[str, Any], leaf: Callable[[Any], Any] = repr, prefix: str = ""
) -> dict[str, Any]:
    """A recipe as dotted keys -> `leaf(value)`, without what a resume may change: what a resume compares,
    and what trackers record as hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if may_change_on_resume(name):
            continue
        if isinstance(value, Mapping):
            flat.update(kept_on_resume(value, leaf, f"{name}."))
        else:
            flat[name] = leaf(value)
    return flat


def resume_conflicts(*recipes: Mapping[str, Any]) -> list[str]:
    """The keys, outside MAY_CHANGE_ON_RESUME, in which these resolved recipes (as dicts) disagree."""
    flats = [kept_on_resume(recipe) for recipe in recipes]
    keys = sorted({key for flat in flats for key in flat})
    return [key for key in keys if len({flat.get(key) for flat in flats}) > 1]


def check_resume(stored: Recipe, resumed: Recipe) -> None:
    """RecipeError naming every key that a resume would change but may not."""
    conflicts = resume_conflicts(stored.to_dict(), resumed.to_dict())
    if conflicts:
        raise RecipeError(
            f"{', '.join(conflicts)}: a resumed run keeps its recipe except "
            f"{', '.join(MAY_CHANGE_ON_RESUME)}; start a new run (another run.name) to change these"
        )


def check_resume_point(start_step: int, total_steps: int) -> None:
    """RecipeError when a resume lowered `train.max_steps` below the checkpoint it resumes from (checked by
    `submit --resume` before anything is queued, and by the trainer at its start)."""
    if start_step > total_steps:
        raise RecipeError(
            f"train.max_steps: the run ends at step {total_steps}, before its step-{start_step} checkpoint; "
            f"set train.max_steps to {start_step} or more"
        )
