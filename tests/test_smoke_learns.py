"""The README's first command: the smoke recipe, submitted as users do through SLURM, learns (WER 1.0 ->
<= 0.3); `--wait` shows progress while it runs and ends with the results table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from asrlaunch.core.records import is_start

from .conftest import PYTHON, RECIPES, ROOT, python_env
from .slurm_cluster import SLURM_MARKS

pytestmark = SLURM_MARKS  # through the local SLURM cluster, as the README's first command runs it


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
    assert "submitted slurm job" in done.stdout  # through the local SLURM cluster, as `make demo` runs it
    assert "COMPLETED: runs/smoke, final WER" in done.stdout
    progress = [line for line in done.stdout.splitlines() if line.startswith("[wait] runs/smoke: ")]
    assert any(" step " in line and "/260 " in line and "RUNNING" in line for line in progress), progress
    table = done.stdout.split("# runs/smoke\n")[1]
    assert table.startswith("| Training Loss | Epoch | Step | Validation Loss | Wer")
    assert (
        "model card: runs/smoke/final/README.md" in done.stdout
        and "plot: runs/smoke/curves.png" in done.stdout
    )
    assert (tmp_path / "runs" / "smoke" / "results.md").read_text() in done.stdout
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "data" / "smoke-tones" / "TRAIN").is_dir()  # generated on first use
    evals = [
        json.loads(line)
        for line in (tmp_path / "runs" / "smoke" / "logs" / "rank0.jsonl").read_text().splitlines()
    ]
    (meta,) = [r for r in evals if is_start(r)]
    job_id = done.stdout.split("submitted slurm job ")[1].split(":")[0]
    assert meta["job_id"] == job_id and meta["slurm_restart_count"] == 0
    # The job's output holds our lines; the libraries' noise went to the debug log.
    output = "".join(
        p.read_text() for p in (tmp_path / "runs" / "smoke" / "submitit").glob(f"{job_id}_*_log.*")
    )
    assert "[train] step=" in output and "corpus: " in output
    for noise in ("real_accelerator.py", "Setting accelerator to CPU", "Writing model shards", "it/s]"):
        assert noise not in output, noise
    assert (tmp_path / "runs" / "smoke" / "logs" / "debug-rank0.log").exists()
    wer = [r["wer"] for r in evals if r["kind"] == "eval"]
    assert wer[0] >= 0.95  # an untrained model gets nothing right
    assert wer[-1] <= 0.3
