"""Launcher wall times: --dry-run of timit32, a 100-element sweep submitted to the local SLURM cluster
(then cancelled), and status over those 100 run directories. Targets: 1.5 s, 5 s, 2 s.

    python bench/launcher.py      (needs `bash slurm/cluster.sh start` for the last two)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBMIT, STATUS = str(ROOT / "launch" / "submit.py"), str(ROOT / "launch" / "status.py")


def timed(command: list[str], cwd: str, exits: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode not in exits:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr.decode()}")
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        dry = min(
            # The whole plan is printed; without TIMIT here its preflight fails, so it exits 2.
            timed([sys.executable, SUBMIT, str(ROOT / "recipes/timit32.yaml"), "--dry-run"], work, (0, 2))
            for _ in range(3)
        )
        print(f"dry run of timit32 (best of 3):          {dry:6.2f} s   (target < 1.5 s)")
        if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
            print("no local SLURM cluster: skipping the sweep and status figures")
            return
        values = ",".join(str(seed) for seed in range(100))
        sweep = timed(
            [
                sys.executable,
                SUBMIT,
                str(ROOT / "recipes/smoke.yaml"),
                "run.name=bench",
                f"data.dir={work}/corpus",
                "cluster.partition=low",
                "--executor",
                "slurm",
                "--sweep",
                f"train.seed={values}",
            ],
            work,
        )
        print(f"submit a 100-element sweep (job array): {sweep:6.2f} s   (target < 5 s)")
        status = timed([sys.executable, STATUS, f"{work}/runs/bench"], work)
        print(f"status over 100 run directories:        {status:6.2f} s   (target < 2 s)")
        subprocess.run(["scancel", "--name", "bench"], check=False)
        wait_until_gone("bench")  # a cancelled element still writes its run directory as it ends


def wait_until_gone(name: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "--me", "-h", "--name", name], capture_output=True, text=True)
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        time.sleep(1)
    print(f"warning: jobs named {name} still listed after {timeout_s:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
