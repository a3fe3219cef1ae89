"""Recipe + overrides + sweeps -> the runs of one submission, each with its run directory. No torch.

A sweep is the cross product of `--sweep KEY=V1,V2` axes, submitted as one SLURM job array; each element is
a run of its own under <output_root>/<run.name>/<element>/, named after its values (`lr=0.0003_seed=2`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.recipe import Recipe, RecipeError, merge, parse_overrides, qualify_key, recipe_from_dict
from asrlaunch.core.rundir import RunDir, SweepDir

# Keys every element of a job array must share: one job shape, one sweep root.
UNSWEEPABLE = ("cluster.", "run.")


@dataclass(frozen=True)
class RunSpec:
    """One run to submit: its resolved recipe, the overrides that made it, and its directory."""

    recipe: Recipe
    overrides: tuple[str, ...]
    run_dir: RunDir


def expand_sweep(sweeps: Sequence[str]) -> list[tuple[str, ...]]:
    """`--sweep train.lr=1e-4,3e-4 --sweep train.seed=1,2` -> the cross product of override tuples."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise RecipeError(f"sweep {sweep!r} must look like section.key=v1,v2 (e.g. train.lr=1e-4,3e-4)")
        key = qualify_key(key)
        if key.startswith(UNSWEEPABLE):
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
        run_dir = SweepDir(root).element(element_name(element)) if sweeps else RunDir(root)
        specs.append(RunSpec(recipe, (*overrides, *element), run_dir))
    names = [spec.run_dir.path for spec in specs]
    if len(set(names)) != len(names):
        raise RecipeError(
            f"sweep elements share a directory name ({', '.join(map(str, names))}): "
            "use values that differ in more than punctuation"
        )
    return specs


def submitit_folder(specs: Sequence[RunSpec]) -> Path:
    """submitit's folder: in the run directory, or for a sweep in the sweep's root (one array, one folder)."""
    return specs[0].run_dir.submitit if len(specs) == 1 else SweepDir(specs[0].run_dir.path.parent).submitit
