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
