"""Paths written in a recipe: `~` and `$VARIABLE`s, as a shell would expand them.

Where they are expanded is the point. `data.dir` and a local `model.name_or_path` are read where the recipe
is resolved (the submitting shell: its home, its variables, its working directory), so the run's recipe.yaml
names the very folders the preflight checked, and every job, requeue, resume and evaluation of the run reads
them wherever it starts; `run.output_root` is expanded there too (the launcher alone reads it).
`data.cache_dir` alone is expanded where the corpus is read, on each node (`$SLURM_TMPDIR/asr`: every node's
own disk; data/prepare.py). Launcher-side: no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME}


def variables(text: str) -> list[str]:
    """The variables a path names, in order, each once."""
    return list(dict.fromkeys(a or b for a, b in VARIABLE.findall(text)))


def expand(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`~` and every `$VARIABLE` expanded; a variable that is not set raises ValueError naming it."""
    environ = os.environ if environ is None else environ
    if unset := [name for name in variables(text) if name not in environ]:
        names = ", ".join(f"${name}" for name in unset)
        raise ValueError(f"{names} is not set on {os.uname().nodename}")
    return os.path.expanduser(VARIABLE.sub(lambda m: environ[m.group(1) or m.group(2)], text))


def resolved(text: str) -> str:
    """A recipe's path as every job of the run reads it: expanded, and absolute from the working directory
    where the recipe is resolved (an absolute path stays as it is, so re-reading a run's recipe changes
    nothing)."""
    expanded = expand(text)
    return expanded if os.path.isabs(expanded) else os.path.abspath(expanded)


def checkpoint(name_or_path: str) -> str:
    """`model.name_or_path`: a local checkpoint resolved, a hub name as it is. Local is what transformers
    takes for local, a folder that exists, or a path that names `~` or a variable."""
    local = "$" in name_or_path or name_or_path.startswith("~") or os.path.isdir(name_or_path)
    return resolved(name_or_path) if local else name_or_path
