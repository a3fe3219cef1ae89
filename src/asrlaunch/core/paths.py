"""Paths written in a recipe: `~` and `$VARIABLE`s, as a shell would expand them.

Where they are expanded is the point. `data.dir` and a local `model.name_or_path` are read where a recipe
is resolved for a new run (the submitting shell: its home, its variables, its working directory), so the
run's recipe.yaml names the very folders the preflight checked, and every job, requeue and resume of the run
reads that file as it is, wherever it starts; `run.output_root` is expanded there too (the launcher alone
reads it). A job's own variables (`$SLURM_TMPDIR`) are refused there: the value at submission is not the
job's. `data.cache_dir` alone is expanded where the corpus is read, on each node (`$SLURM_TMPDIR/asr`: every
node's own disk; data/prepare.py). Launcher-side: no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationInfo

VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME}
NEW_RUN = "new_run"  # the recipe validation context's key: a recipe resolved for a new run
JOB_OWN = re.compile(r"SLURM_\w+|TMPDIR")  # each job's own, even where set at submission (inside an salloc)


def variables(text: str) -> list[str]:
    """The variables a path names, in order, each once."""
    return list(dict.fromkeys(a or b for a, b in VARIABLE.findall(text)))


def expand(text: str) -> str:
    """`~` and every `$VARIABLE` expanded; a variable that is not set raises ValueError naming it."""
    if unset := [name for name in variables(text) if name not in os.environ]:
        names = ", ".join(f"${name}" for name in unset)
        raise ValueError(f"{names} is not set on {os.uname().nodename}")
    return os.path.expanduser(VARIABLE.sub(lambda m: os.environ[m.group(1) or m.group(2)], text))


def expand_at_submission(text: str) -> str:
    """`expand`, refusing a job's own variable: its value here is not the one the run's jobs will have."""
    if own := [name for name in variables(text) if JOB_OWN.fullmatch(name)]:
        names = ", ".join(f"${name}" for name in own)
        raise ValueError(
            f"{names} is each job's own, and this path is read where the run is submitted (the preflight) "
            "and then by every job: name a folder that both see"
        )
    return expand(text)


def resolved(text: str) -> str:
    """A recipe's path as every job of the run reads it: expanded, and absolute from the working directory
    where the recipe is resolved (`..` kept: with symlinks, only the file system may resolve it)."""
    return str(Path(expand_at_submission(text)).absolute())


def checkpoint(name_or_path: str) -> str:
    """`model.name_or_path`: a local checkpoint resolved, a hub name as it is. Local is what transformers
    takes for local, a folder that exists, or a path that names `~` or a variable."""
    local = "$" in name_or_path or name_or_path.startswith("~") or os.path.isdir(name_or_path)
    return resolved(name_or_path) if local else name_or_path


def at_submission(read: Callable[[str], str]) -> Callable[[Any, str, ValidationInfo], str]:
    """A recipe field's validator: `read` the path when a recipe is resolved for a new run; a run's own
    recipe.yaml, read again, keeps its paths as they were resolved (recipe.py's load_run_recipe)."""

    def validator(cls: Any, value: str, info: ValidationInfo) -> str:
        return read(value) if info.context and info.context.get(NEW_RUN) else value

    return validator
