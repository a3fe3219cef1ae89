"""The run directory: every file and folder of a run, named once. Launcher side: no torch.

<output_root>/<run.name>/            (a sweep: <output_root>/<run.name>/<element>/, see SweepDir)
  recipe.yaml          the resolved recipe (what actually runs)
  plan.json            the batch plan of the submission (every start's own plan is in its start record)
  job.json             every job that worked on the run (id, executor, submission time, overrides)
  submitit/            submitit's pickles, sbatch script and per-task stdout/stderr
  logs/rank<R>.jsonl   per-rank records of every attempt (see records.py)
  heartbeats/rank<R>.json   what each rank does now (job/heartbeat.py), read by the supervisor
  stacks/              Python stacks of hung ranks
  checkpoints/step-NNNNNN/   self-describing checkpoints (see checkpoint.py)
  final/               save_pretrained model + processor, finished.json, README.md (the model card)
  tracking/            experiment-tracker files (TensorBoard events, MLflow store, W&B runs, run ids)
  results.md results.csv results.json curves.png
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RANK_LOG = re.compile(r"^rank(\d+)\.jsonl$")
HEARTBEAT = re.compile(r"^rank(\d+)\.json$")


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (status, a resumed rank) never see half a file: write a private file, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or unreadable (status never fails on a half-made run)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    # -- what the launcher writes ----------------------------------------------------------------------------
    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def job(self) -> Path:
        return self.path / "job.json"

    @property
    def prepared(self) -> Path:
        """What the preparation job (`cluster.prepare_partition`) did: ok, or its error."""
        return self.path / "prepare.json"

    def read_prepared(self) -> dict[str, Any]:
        return read_json(self.prepared)

    def write_prepared(self, outcome: dict[str, Any]) -> None:
        write_text_atomic(self.prepared, json.dumps(outcome, indent=1) + "\n")

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    # -- what the ranks write -------------------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.jsonl"

    def debug_log(self, rank: int) -> Path:
        """The libraries' own output on rank R (engine/output.py)."""
        return self.logs / f"debug-rank{rank}.log"

    def rank_logs(self) -> dict[int, Path]:
        """Rank -> log file, for every rank that has one."""
        if not self.logs.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.logs.iterdir() if (m := RANK_LOG.match(p.name))}
        return dict(sorted(found.items()))

    @property
    def heartbeats_dir(self) -> Path:
        return self.path / "heartbeats"

    def heartbeat(self, rank: int) -> Path:
        """What rank R is doing now, rewritten every few seconds (job/heartbeat.py)."""
        return self.heartbeats_dir / f"rank{rank}.json"

    def corpus_ready(self, attempt: int, start: str) -> Path:
        """Rank 0 has the corpus of this start prepared: the other ranks, waiting for it, load it too."""
        return self.heartbeats_dir / f"corpus-attempt{attempt}-{start}.ready"

    def heartbeats(self) -> dict[int, Path]:
        if not self.heartbeats_dir.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.heartbeats_dir.iterdir() if (m := HEARTBEAT.match(p.name))}
        return dict(sorted(found.items()))

    @property
    def stacks(self) -> Path:
        """Python stacks of hung ranks (the supervisor's, and each rank's faulthandler)."""
        return self.path / "stacks"

    def rank_stacks(self, rank: int, pid: int) -> Path:
        """Where rank R's process `pid` writes its stacks when asked (SIGQUIT)."""
        return self.stacks / f"rank{rank}-pid{pid}.txt"

    def every_rank_stacks(self, rank: int) -> list[Path]:
        """Each process of rank R that was ready to write its stacks, of every attempt."""
        return sorted(self.stacks.glob(self.rank_stacks(rank, 0).name.replace("pid0", "pid*")))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def final_partial(self) -> Path:
        return self.path / "final.partial"

    @property
    def finished_marker(self) -> Path:
        """Written last into final/: the run reached its last step (a rerun exits at once)."""
        return self.final / "finished.json"

    @property
    def tracking(self) -> Path:
        return self.path / "tracking"

    # -- what the collector writes ---------------------------------------------------------------------------
    @property
    def card(self) -> Path:
        return self.final / "README.md"

    @property
    def results_md(self) -> Path:
        return self.path / "results.md"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    # -- state ---------------------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.recipe.exists()

    def is_finished(self) -> bool:
        return self.finished_marker.exists()

    def create(self, recipe_yaml: str, plan: dict[str, Any]) -> None:
        """The run's folders, its resolved recipe and its plan: written here only, when a run is submitted (or
        resubmitted with `--resume`) or first trained without a launcher. Each start's own plan is in its
        start record."""
        for folder in (self.logs, self.checkpoints, self.submitit):
            folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.recipe, recipe_yaml)
        write_text_atomic(self.plan, json.dumps(plan, indent=1) + "\n")

    def read_plan(self) -> dict[str, Any]:
        return read_json(self.plan)

    def jobs(self) -> list[dict[str, Any]]:
        return list(read_json(self.job).get("jobs", []))

    def record_job(self, entry: dict[str, Any]) -> None:
        """Append a job to job.json (a run keeps every job that worked on it)."""
        write_text_atomic(self.job, json.dumps({"jobs": [*self.jobs(), entry]}, indent=1) + "\n")

    def mark_finished(self, step: int) -> None:
        """Written last into final/: the run reached its last step."""
        write_text_atomic(self.finished_marker, json.dumps({"step": step, "done": True}))


@dataclass(frozen=True)
class SweepDir:
    """The root of a sweep: one job array, one element run directory per combination of values."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    @property
    def summary(self) -> Path:
        return self.path / "summary.md"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    def element(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def elements(self) -> list[RunDir]:
        return sorted(
            (RunDir(p.parent) for p in self.path.glob(f"*/{RunDir(self.path).recipe.name}")),
            key=lambda run: run.path,
        )


def expand_run_dirs(paths: list[str] | list[Path] | tuple[str | Path, ...]) -> list[RunDir]:
    """Run directories, with a sweep's root standing for all its elements."""
    runs: list[RunDir] = []
    for path in map(Path, paths):
        run = RunDir(path)
        runs.extend([run] if run.is_run() else SweepDir(path).elements())
    return runs
