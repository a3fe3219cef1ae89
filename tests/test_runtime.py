"""Worker-side process settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import engine_command, python_env, train_to_the_end

MIB = 2**20
# Bytes glibc holds in mmap'd blocks (mallinfo2's hblkhd) while a 64 MiB tensor is alive.
HELD_IN_MMAP = """
import ctypes, sys, torch
from asrlaunch.engine.runtime import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
tensor = torch.ones(16 * 2**20)
print(libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_cpu_tensors_come_from_the_heap_once_freed_memory_is_kept() -> None:
    def held_in_mmap(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", HELD_IN_MMAP, mode],
            env=python_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.split()[-1])

    assert held_in_mmap("default") >= 64 * MIB  # glibc's default: mmap, unmapped again when freed
    assert held_in_mmap("keep") < 64 * MIB  # from the heap, which keeps it for the next step


# A training rank run through the CLI, which then says which top-level packages it had imported by its end,
# in a file of its own (two ranks' long lines on one pipe can interleave).
IMPORTS_OF_A_RUN = """
import json, os, pathlib, sys
from asrlaunch.cli.main import main
code = main(sys.argv[1:])
packages = sorted({name.split(".")[0] for name in sys.modules})
rank = os.environ.get("RANK", "0")
report = pathlib.Path(__file__).with_name(f"imported-{rank}.json")
report.write_text(json.dumps({"rank": rank, "code": code, "packages": packages}))
"""
# Installed by `make venv` (extras train, deepspeed, test), never needed by a DDP run without trackers on a
# prepared corpus.
NOT_USED_BY_THE_RUN = (
    "datasets",
    "pandas",
    "fsspec",
    "deepspeed",
    "mlflow",
    "wandb",
    "tensorboard",
    "matplotlib",
)


def test_a_started_rank_imports_only_what_its_run_uses(tones_corpus: Path, tmp_path: Path) -> None:
    """Every start, restart and requeue pays a rank's imports: two gloo ranks on a prepared corpus, with
    evaluations, checkpoints and the final save, load none of the installed packages the run does not use
    (`datasets` and its pandas and fsspec, DeepSpeed, the trackers)."""
    overrides = ("train.max_steps=4", "eval.steps=2", "checkpoint.save_steps=2", "logging.report_to=[none]")
    train_to_the_end(tmp_path / "first", tones_corpus, 1, "train.max_steps=1", "eval.at_start=false")
    probe = tmp_path / "probe.py"
    probe.write_text(IMPORTS_OF_A_RUN)
    command = engine_command(tmp_path / "second", tones_corpus, 2, *overrides)
    at = command.index("-m", 1 + command.index("--nproc_per_node=2"))
    command[at : at + 2] = [str(probe)]
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("imported-*.json"))]
    assert sorted(r["rank"] for r in reports) == ["0", "1"] and all(r["code"] == 0 for r in reports)
    for report in reports:
        assert {"torch", "transformers", "accelerate", "pyarrow"} <= set(report["packages"])
        loaded = sorted(set(NOT_USED_BY_THE_RUN) & set(report["packages"]))
        assert not loaded, f"rank {report['rank']} imported {loaded}"
