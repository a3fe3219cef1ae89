"""Shared fixtures. Everything runs offline: no model hub, no downloads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asrlaunch.core.records import Event

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)


@pytest.fixture(scope="session")
def tones_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated corpus in TIMIT's layout (SPHERE audio, upper-case names)."""
    from asrlaunch.data.synth import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus") / "TIMIT", train=64, test=16, seed=1)


def notable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The event records that say what happened to a run (stops, errors, failures, splits), without the ones
    that only account for time or for an injected fault (`checkpoint`, `fault`)."""
    quiet = {Event.CHECKPOINT.value, Event.FAULT.value}
    return [r for r in records if r.get("event") and r["event"] not in quiet]


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: offline, unbuffered, our sources importable."""
    return {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **extra}


PYTHON = sys.executable


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. torchrun starts its workers in sessions of their own, so killing its
    process group leaves them running: a test that means to kill a job kills the whole tree."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it, as a node failure or the OOM killer would."""
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def engine_command(run_dir: Path, corpus: Path, processes: int, *overrides: str) -> list[str]:
    """The engine on the smoke recipe as users start it: plain Python for one process, torchrun (gloo) for
    more; the corpus cache lives beside the run directory."""
    launcher = (
        [PYTHON]
        if processes == 1
        else [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
    )
    return [
        *launcher,
        "-m",
        "asrlaunch",
        "train",
        str(RECIPES / "smoke.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.dir={corpus}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        *overrides,
    ]


TRAINED_SMOKE = ("train.max_steps=200", "train.global_batch_size=8", "eval.steps=200", "eval.at_start=false")


@pytest.fixture(scope="session")
def trained_smoke(tones_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke model after 200 steps of 8: it transcribes (WER below 1), so transcripts can disagree."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    return train_to_the_end(run_dir, tones_corpus, 1, *TRAINED_SMOKE, threads=2)


class BackgroundRun:
    """An uninterrupted engine run (`engine_command`), started now and awaited by `result()`: a test starts
    its reference run first, which then trains while the job waits on requeues (SLURM tests) or on the idle
    core beside a one-thread run."""

    def __init__(
        self, run_dir: Path, corpus: Path, processes: int, *overrides: str, threads: int = 1
    ) -> None:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.stderr = run_dir, run_dir.parent / f"{run_dir.name}.stderr"
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(
                engine_command(run_dir, corpus, processes, *overrides),
                env=python_env(OMP_NUM_THREADS=str(threads)),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def result(self, timeout: float = 900) -> Path:
        """The run directory, once the run has ended, and succeeded."""
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                kill_tree(self.process.pid)
        assert returncode == 0, self.stderr.read_text()[-3000:]
        return self.run_dir


def train_to_the_end(run_dir: Path, corpus: Path, processes: int, *overrides: str, threads: int = 1) -> Path:
    """An uninterrupted engine run that must succeed; its run directory."""
    return BackgroundRun(run_dir, corpus, processes, *overrides, threads=threads).result()
