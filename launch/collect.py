"""Merge the per-rank logs of every attempt into the results table, the model card and plots.

    python launch/collect.py RUN_DIR [RUN_DIR or SWEEP_ROOT ...] [--compare ../shared/reference/model-card.md]

Writes <run_dir>/results.{md,csv,json}, curves.png and final/README.md; for a sweep's root also
summary.md and curves.png there. Never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asrlaunch.card import plot_curves
from asrlaunch.collect import MixedRunsError, collect_run, compare_tables, render_table, sweep_summary
from asrlaunch.status import expand_run_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="run directories or a sweep's root")
    parser.add_argument(
        "--compare", metavar="MODEL_CARD", help="print a model card's results table beside ours"
    )
    args = parser.parse_args(argv)
    exit_code = 0
    for path in map(Path, args.paths):
        run_dirs = expand_run_dirs([path])
        if not run_dirs:
            print(f"error: {path}: no run directory (with recipe.yaml) here", file=sys.stderr)
            return 2
        results = []
        for run_dir in run_dirs:
            try:
                result = collect_run(run_dir)
            except (FileNotFoundError, MixedRunsError, ValueError) as error:
                print(f"error: {error}", file=sys.stderr)
                exit_code = 2
                continue
            results.append(result)
            print(f"# {run_dir}  (restarts at steps: {result['restarts'] or 'none'})")
            print(render_table([row.values() for row in result["rows"]]))
            print(f"wrote {run_dir}/results.md, results.csv, results.json, curves.png, final/README.md\n")
            if args.compare:
                try:
                    print(compare_tables(Path(args.compare).read_text(), result["rows"]) + "\n")
                except (OSError, ValueError) as error:
                    print(f"error: --compare {args.compare}: {error}", file=sys.stderr)
                    return 2
        if len(run_dirs) > 1 and results:
            summary = sweep_summary(results)
            (path / "summary.md").write_text(summary)
            plot_curves(path / "curves.png", {Path(r["run_dir"]).name: r["run"] for r in results})
            print(f"# sweep {path}\n{summary}\nwrote {path}/summary.md and {path}/curves.png")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
