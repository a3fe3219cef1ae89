"""Recipe + overrides + sweeps -> the runs of one submission, each with its run directory. No torch.

A sweep is the cross product of `--sweep KEY=V1,V2` axes, submitted as one SLURM job array; each element is
a run of its own under <output_root>/<run.name>/<element>/, named after its values (`lr=0.0003_seed=2`).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.recipe import (
    Recipe,
    RecipeError,
    merge,
    parse_overrides,
    qualify_key,
    recipe_from_dict,
)
from asrlaunch.core.rundir import RunDir, SweepDir

# Keys every element of a job array must share: one job shape, one sweep root.
UNSWEEPABLE = ("cluster.", "run.")


@dataclass(frozen=True)
class RunSpec:
    """One run to submit: its resolved recipe, the overrides that made it, and its directory."""

    recipe: Recipe
    overrides: tuple[str, ...]
    run_dir: RunDir


def split_values(text: str) -> list[str]:
    """`1e-4,3e-4` -> two values; a comma inside [..] or {..} is part of its value (`[0.9,0.98],[0.9,1]`)."""
    values: list[str] = []
    depth, current = 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values, current = [*values, current.strip()], ""
        else:
            current += char
    return [*values, current.strip()]


def sweep_axis(sweep: str, seen: set[str]) -> list[str]:
    """One `--sweep KEY=V1,V2` -> its overrides; a RecipeError names what is wrong with it."""
    key, sep, values = sweep.partition("=")
    if not sep or not key.strip() or not values:
        raise RecipeError(f"sweep {sweep!r} must look like section.key=v1,v2 (e.g. train.lr=1e-4,3e-4)")
    key = qualify_key(key.strip())
    if key.startswith(UNSWEEPABLE):
        raise RecipeError(
            f"sweep over {key}: the elements of a job array share one job shape and one "
            "sweep root; submit separate runs instead"
        )
    if key in seen:
        raise RecipeError(f"{key} is swept or overridden twice: give all its values in one --sweep {key}=...")
    seen.add(key)
    items = split_values(values)
    if "" in items:
        raise RecipeError(f"sweep {sweep!r}: an empty value (values are separated by commas)")
    return [f"{key}={item}" for item in items]


def expand_sweep(sweeps: Sequence[str], overrides: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """`--sweep train.lr=1e-4,3e-4 --sweep train.seed=1,2` -> the cross product of override tuples; every
    problem of every axis (and a key both swept and overridden) in one RecipeError."""
    seen = set()
    for item in overrides:
        with contextlib.suppress(RecipeError):  # an ambiguous key: parse_overrides names it
            seen.add(qualify_key(item.partition("=")[0].strip()))
    axes, problems = [], []
    for sweep in sweeps:
        try:
            axes.append(sweep_axis(sweep, seen))
        except RecipeError as problem:
            problems.append(str(problem))
    if problems:
        raise RecipeError("\n".join(problems), problems)
    return [tuple(combo) for combo in itertools.product(*axes)] if axes else [()]


def element_name(overrides: Sequence[str]) -> str:
    """A directory name for one sweep element: `lr=0.0003_seed=2`; other characters become `-`."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        # a list's brackets and spaces say nothing in a name: `[0.9, 0.98]` -> `0.9-0.98`
        parts.append(f"{key.split('.')[-1]}={re.sub(r'[][{} ]', '', value)}")
    name = "_".join(parts) or "run"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", name)


def resolve_runs(
    base: dict[str, Any], source: str, overrides: Sequence[str], sweeps: Sequence[str], new_run: bool = True
) -> list[RunSpec]:
    """Every run of a submission, validated before anything is written or submitted (`new_run`: its paths
    are read here; false for a resumed run's own recipe)."""
    common, problems = dict(base), []
    elements: list[tuple[str, ...]] = [()]
    try:
        common = merge(base, parse_overrides(overrides))
    except RecipeError as problem:
        problems += problem.problems
    try:
        elements = expand_sweep(sweeps, overrides)
    except RecipeError as problem:
        problems += problem.problems
    if problems:  # the command line's own problems, all of them, before the recipe's
        raise RecipeError("\n".join(problems), problems)
    specs = []
    for element in elements:
        try:
            recipe = recipe_from_dict(merge(common, parse_overrides(element)), source, new_run)
        except RecipeError as problem:
            problems += [line for line in problem.problems if line not in problems]
            continue
        root = Path(recipe.run.output_root) / recipe.run.name
        run_dir = SweepDir(root).element(element_name(element)) if sweeps else RunDir(root)
        specs.append(RunSpec(recipe, (*overrides, *element), run_dir))
    if problems:
        lines = "\n".join(f"  {line}" for line in problems)
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n{lines}", problems)
    runs: dict[str, RunSpec] = {}
    for spec in specs:
        if (twin := runs.setdefault(repr(spec.recipe.to_dict()), spec)) is not spec:
            raise RecipeError(
                f"sweep elements {twin.run_dir.path.name} and {spec.run_dir.path.name} are the same run "
                "(their values are equal once read): drop one"
            )
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
