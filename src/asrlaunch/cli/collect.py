"""Merge the per-rank logs of every attempt into the results table, the model card and plots.

    asrlaunch collect RUN_DIR [RUN_DIR or SWEEP_ROOT ...] [--compare ../shared/reference/model-card.md]

Writes <run_dir>/results.{md,csv,json}, curves.png and final/README.md; for a sweep's root also
summary.md and curves.png there. Never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.core.goodput import clock, goodput, stop_history, stragglers
from asrlaunch.core.rundir import RunDir, SweepDir
from asrlaunch.results.merge import MixedRunsError, RunResult, run_result
from asrlaunch.results.report import write_run_report, write_sweep_report
from asrlaunch.results.table import compare_tables, parse_table, render_table


def run_notes(result: RunResult) -> list[str]:
    """Goodput, the stops and what each cost, and the slow ranks of the latest attempt."""
    history = result.run.history
    lines = [f"goodput: {goodput(history).summary()}"]
    lines += [
        f"stop: {kind} at step {step}, {clock(cost)} lost" for _, kind, step, cost in stop_history(history)
    ]
    return lines + [f"slow: {s.describe()}" for s in stragglers(history.current)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="run directories or a sweep's root")
    parser.add_argument(
        "--compare", metavar="MODEL_CARD", help="print a model card's results table beside ours"
    )
    args = parser.parse_args(argv)
    clean_warnings()
    problems, reference = [], None
    if args.compare:  # read and parsed before anything is written
        try:
            reference = Path(args.compare).read_text()
            parse_table(reference)
        except (OSError, UnicodeDecodeError, ValueError) as problem:
            problems.append(f"--compare {args.compare}: {getattr(problem, 'strerror', None) or problem}")
    found = {
        path: [RunDir(path)] if RunDir(path).is_run() else SweepDir(path).elements()
        for path in map(Path, args.paths)
    }
    problems += [
        f"{path}: no run directory (with {RunDir(path).recipe.name}) here"
        for path, runs in found.items()
        if not runs
    ]
    if problems:
        error("\n".join(problems))
        return ExitCode.USAGE
    exit_code = ExitCode.OK
    for path, run_dirs in found.items():
        results = []
        for run_dir in run_dirs:
            if not run_dir.rank_logs():  # a sweep's element still queued: the others are collected
                print(f"# {run_dir}: no logs yet (its job has not started)\n")
                continue
            try:
                result = run_result(run_dir)
            except (FileNotFoundError, MixedRunsError, ValueError) as problem:
                error(problem)
                exit_code = ExitCode.USAGE
                continue
            results.append(result)
            written = write_run_report(result)
            print(f"# {run_dir}  (restarts at steps: {result.run.restarts or 'none'})")
            print(render_table([row.values() for row in result.rows]))
            for line in run_notes(result):
                print(line)
            print(f"wrote {', '.join(str(p) for p in written)}\n")
            if reference is not None:
                print(compare_tables(reference, result.rows) + "\n")
        if len(run_dirs) > 1 and results:
            sweep = SweepDir(path)
            written = write_sweep_report(sweep, results)
            print(f"# sweep {path}\n{sweep.summary.read_text()}\nwrote {', '.join(str(p) for p in written)}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
