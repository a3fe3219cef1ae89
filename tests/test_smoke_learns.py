"""The README's first command: the smoke recipe, submitted as users do, learns (WER 1.0 -> <= 0.3)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, RECIPES, ROOT, python_env

pytestmark = pytest.mark.slow


def test_smoke_recipe_as_the_readme_runs_it_learns(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, str(ROOT / "launch" / "submit.py"), str(RECIPES / "smoke.yaml"), "--wait"],
        cwd=tmp_path,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED: runs/smoke, final WER" in done.stdout
    assert (tmp_path / "data" / "smoke-tones" / "TRAIN").is_dir()  # generated on first use
    evals = [
        json.loads(line)
        for line in (tmp_path / "runs" / "smoke" / "logs" / "rank0.jsonl").read_text().splitlines()
    ]
    wer = [r["wer"] for r in evals if r["kind"] == "eval"]
    assert wer[0] >= 0.95  # an untrained model gets nothing right
    assert wer[-1] <= 0.3
