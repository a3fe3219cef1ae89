"""Shared fixtures. Everything runs offline: no model hub, no downloads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)


@pytest.fixture(scope="session")
def tones_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated corpus in TIMIT's layout (SPHERE audio, upper-case names)."""
    from asrlaunch.data.synth import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus") / "TIMIT", train=64, test=16, seed=1)


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: offline, unbuffered, our sources importable."""
    return {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **extra}


PYTHON = sys.executable


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
        "asrlaunch.train",
        str(RECIPES / "smoke.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.dir={corpus}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        *overrides,
    ]
