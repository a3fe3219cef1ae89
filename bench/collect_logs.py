"""Collector speed: 64 ranks x 3000 steps, logging every step (~200k lines), target under 2 s; and time per
line from 10k to 1M lines (it should stay flat).

    python bench/collect_logs.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from asrlaunch.core.records import Kind
from asrlaunch.core.rundir import RunDir
from asrlaunch.results.merge import read_run
from asrlaunch.results.table import result_rows


def write_logs(run_dir: Path, ranks: int, steps: int) -> int:
    run = RunDir(run_dir)
    run.logs.mkdir(parents=True)
    plan = {"steps_per_epoch": 145, "world_size": ranks}
    recipe = {"run": {"name": "bench"}, "train": {"seed": 42}}
    lines = 0
    for rank in range(ranks):
        with run.rank_log(rank).open("w") as file:
            file.write(
                json.dumps(
                    {
                        "kind": Kind.META.value,
                        "step": 0,
                        "epoch": 0,
                        "rank": rank,
                        "attempt": 0,
                        "time": 0.0,
                        "world_size": ranks,
                        "plan": plan,
                        "recipe": recipe,
                    }
                )
                + "\n"
            )
            for step in range(1, steps + 1):
                file.write(
                    json.dumps(
                        {
                            "kind": Kind.TRAIN.value,
                            "step": step,
                            "epoch": round(step / 145, 4),
                            "rank": rank,
                            "attempt": 0,
                            "time": float(step),
                            "loss": 3.0 / step,
                            "lr": 1e-4,
                            "grad_norm": 1.0,
                            "samples_per_s": 20.0,
                        }
                    )
                    + "\n"
                )
                if rank == 0 and step % 100 == 0:
                    file.write(
                        json.dumps(
                            {
                                "kind": Kind.EVAL.value,
                                "step": step,
                                "epoch": step / 145,
                                "rank": 0,
                                "attempt": 0,
                                "time": float(step),
                                "eval_loss": 0.3,
                                "wer": 0.2,
                            }
                        )
                        + "\n"
                    )
            lines += steps + 1
    return lines


def measure(ranks: int, steps: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        lines = write_logs(Path(tmp), ranks, steps)
        start = time.perf_counter()
        rows = result_rows(read_run(tmp))
        elapsed = time.perf_counter() - start
        assert len(rows) == steps // 100
        return lines, elapsed


def main() -> None:
    lines, elapsed = measure(64, 3000)
    print(f"64 ranks x 3000 steps: {lines} lines in {elapsed:.2f} s (target < 2 s)")
    for ranks, steps in ((4, 2500), (16, 6250), (64, 3125), (64, 15625)):
        lines, elapsed = measure(ranks, steps)
        print(f"{lines:>9} lines: {elapsed:6.2f} s, {elapsed / lines * 1e6:5.2f} us/line")


if __name__ == "__main__":
    main()
