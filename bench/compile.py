"""`train.compile` measured: the same run eager and compiled (torch.compile, dynamic shapes), one process.

    python bench/compile.py [--steps 50] [--model smoke|group-norm]

Prints the compile time (the compiled run's extra time before its steps settle), the steady-state samples/s
of both (the median of the second half of the steps), the recompilations seen, and the largest relative
difference of the per-step training losses (target: 1e-4 over 50 steps). On a CPU by default; on a GPU when
one is there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from asrlaunch.core.logs import read_run_logs
from asrlaunch.core.records import Kind
from asrlaunch.core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
GROUP_NORM = (
    "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128, "
    "conv_dim: [32, 32, 32], conv_stride: [5, 8, 8], conv_kernel: [10, 8, 8], num_conv_pos_embeddings: 16, "
    "num_conv_pos_embedding_groups: 4}"
)


def run(work: Path, corpus: Path, compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = work / ("compiled" if compiled else "eager")
    overrides = [
        f"data.dir={corpus}",
        f"data.cache_dir={work / 'cache'}",
        f"train.max_steps={args.steps}",
        "logging.steps=1",
        "logging.report_to=[none]",
        "eval.steps=100000",
        "eval.at_start=false",
        "checkpoint.save_steps=null",
        f"train.compile={str(compiled).lower()}",
        *([f"model.config={GROUP_NORM}"] if args.model == "group-norm" else []),
    ]
    command = [sys.executable, "-m", "asrlaunch", "train", str(ROOT / "recipes" / "smoke.yaml")]
    done = subprocess.run(
        [*command, "--run-dir", str(run_dir), *overrides], env=ENV, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    records = [r for r in read_run_logs(run_dir) if r["kind"] == Kind.TRAIN]
    steps = [float(r["step_s"]) for r in records]
    settled = steps[len(steps) // 2 :]
    recompiles = done.stderr.count("Recompiling") + RunDir(run_dir).debug_log(0).read_text().count(
        "Recompiling"
    )
    return {
        "losses": [r["loss"] for r in records],
        "first_steps_s": sum(steps[: len(steps) // 2]),
        "steady_step_s": statistics.median(settled),
        "steady_samples_per_s": 32 / statistics.median(settled),
        "recompile_messages": recompiles,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", choices=["smoke", "group-norm"], default="smoke")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compile-"))
    from asrlaunch.data.synth import generate_corpus

    corpus = work / "corpus"
    if not corpus.exists():
        generate_corpus(corpus, train=400, test=10, engine="tones", seed=0)
    eager, compiled = run(work, corpus, False, args), run(work, corpus, True, args)
    differences = [abs(a - b) / abs(a) for a, b in zip(eager["losses"], compiled["losses"], strict=True)]
    report = {
        "model": args.model,
        "steps": args.steps,
        "compile_time_s": round(compiled["first_steps_s"] - eager["first_steps_s"], 1),
        "steady_samples_per_s": {
            "eager": round(eager["steady_samples_per_s"], 1),
            "compiled": round(compiled["steady_samples_per_s"], 1),
        },
        "recompile_messages": compiled["recompile_messages"],
        "max_relative_loss_difference": max(differences),
        "losses_equal_to_1e-4": max(differences) <= 1e-4,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
