"""How long a rank takes to start: what every restart, requeue and test pays before its first step.

    python bench/startup.py [--repeat 3]

Prints the import time of the engine (`asrlaunch.engine.train`, in a fresh interpreter) and the whole
command of a one-step smoke run on a prepared (cached) corpus, without evaluation or checkpoints: imports,
recipe, corpus from cache, model, one step, final save. Medians of `--repeat` runs after one warm-up run.
Then, from `python -X importtime`, the modules a rank imports that a run without `train.compile` does not
need, what each costs and who imports it (tests/test_runtime.py checks that a rank loads none of the installed
packages its run does not use: datasets, pandas, DeepSpeed, the trackers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IMPORT = "import time; t = time.perf_counter(); import asrlaunch.engine.train; print(time.perf_counter() - t)"
# Imported by modules of the stack when they are imported; a run without `train.compile` needs none of them.
NOT_NEEDED = ("torch._dynamo", "torch.distributed.tensor", "transformers.generation.continuous_batching")


def import_seconds() -> float:
    done = subprocess.run([sys.executable, "-c", IMPORT], env=ENV, capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def import_tree() -> list[tuple[str, float, list[str]]]:
    """(module, cumulative seconds, its importers innermost first) of `import asrlaunch.engine.train`, from
    `-X importtime`, which prints a module after the modules it imported, indented one level deeper."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import asrlaunch.engine.train"],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[1].strip().isdigit():
            name = fields[2].rstrip()
            rows.append(((len(name) - len(name.lstrip())) // 2, name.strip(), int(fields[1]) / 1e6))
    parent: dict[int, int] = {}
    waiting: dict[int, list[int]] = {}
    for index, (depth, _, _) in enumerate(rows):
        for child in waiting.pop(depth + 1, []):
            parent[child] = index
        waiting.setdefault(depth, []).append(index)
    tree = []
    for index, (_, name, seconds) in enumerate(rows):
        importers, at = [], index
        while at in parent:
            at = parent[at]
            importers.append(rows[at][1])
        tree.append((name, seconds, importers))
    return tree


def report_not_needed() -> None:
    tree = import_tree()
    total = next(seconds for name, seconds, _ in tree if name == "asrlaunch.engine.train")
    print(
        f"-X importtime: import asrlaunch.engine.train {total:.2f} s; "
        "not needed by a run without train.compile:"
    )
    for module in NOT_NEEDED:
        for name, seconds, importers in tree:
            if name == module:
                ours = next(i for i, m in enumerate(importers) if m.startswith("asrlaunch"))
                print(f"  {module}: {seconds:.2f} s, by {importers[ours - 1]} (in {importers[ours]})")
                break


def one_step_seconds(work: Path, corpus: Path, attempt: int) -> float:
    command = [
        sys.executable,
        "-m",
        "asrlaunch",
        "train",
        str(ROOT / "recipes" / "smoke.yaml"),
        "--run-dir",
        str(work / f"run-{attempt}"),
        f"data.dir={corpus}",
        f"data.cache_dir={work / 'cache'}",
        "train.max_steps=1",
        "eval.steps=100000",
        "eval.at_start=false",
        "checkpoint.save_steps=null",
        "logging.report_to=[none]",
    ]
    started = time.perf_counter()
    subprocess.run(command, env=ENV, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from asrlaunch.data.synth import generate_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        generate_corpus(corpus, train=64, test=8, seed=0)
        one_step_seconds(work, corpus, 0)  # prepares the cache and warms the page cache
        imports = [import_seconds() for _ in range(args.repeat)]
        runs = [one_step_seconds(work, corpus, attempt + 1) for attempt in range(args.repeat)]
    print(f"import asrlaunch.engine.train: {statistics.median(imports):.2f} s (median of {args.repeat})")
    print(f"one-step smoke run, whole command: {statistics.median(runs):.2f} s (median of {args.repeat})")
    report_not_needed()


if __name__ == "__main__":
    main()
