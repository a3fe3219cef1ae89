"""Training throughput (samples/s) of the smoke model on 1 process (2 threads) and 2 gloo processes.

python bench/train_step.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import Kind

ROOT = Path(__file__).resolve().parents[1]


def measure(processes: int, steps: int, corpus: Path, work: Path) -> float:
    run_dir = work / f"p{processes}"
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes)),
    }
    subprocess.run(
        [
            *launcher,
            "-m",
            "asrlaunch",
            "train",
            str(ROOT / "recipes" / "smoke.yaml"),
            "--run-dir",
            str(run_dir),
            f"data.dir={corpus}",
            f"data.cache_dir={work / 'cache'}",
            f"train.max_steps={steps}",
            "logging.steps=5",
            f"eval.steps={steps * 10}",
            "eval.at_start=false",
            "train.max_micro_batch_size=8",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    records = [r for r in read_run_logs(run_dir) if r["kind"] == Kind.TRAIN and r["rank"] == 0]
    return statistics.median(r["samples_per_s"] for r in records[1:])  # the first window includes warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from asrlaunch.data.synth import generate_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = generate_corpus(work / "corpus", train=400, test=10)
        print(f"smoke model, global batch 32, micro-batch <= 8, {args.steps} steps, median of 5-step windows")
        for processes in (1, 2):
            print(f"{processes} process(es): {measure(processes, args.steps, corpus, work):8.1f} samples/s")


if __name__ == "__main__":
    main()
