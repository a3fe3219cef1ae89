"""Where are my runs? SLURM state, nodes, elapsed time, restarts, and step/loss/WER/ETA from the logs.

    asrlaunch status runs/smoke [more run dirs or sweep roots ...] [--watch [SECONDS]] [--json]

Never imports torch: it answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.core.rundir import RunDir, expand_run_dirs
from asrlaunch.launcher.status import collect_status, format_table


def seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds above 0 (e.g. 5)")
    return value


def not_runs(paths: list[str]) -> list[str]:
    """One line per path that names no run: missing, or neither a run directory nor a sweep's root."""
    marker = RunDir(Path()).recipe.name
    return [
        f"{path}: does not exist" if not Path(path).exists() else f"{path}: no run directory (with {marker})"
        for path in paths
        if not expand_run_dirs([path])
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories, or a sweep's root")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=seconds,
        const=5.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5) until interrupted",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    clean_warnings()
    if problems := not_runs(args.run_dirs):
        error("\n".join(problems))
        return ExitCode.USAGE
    if args.watch:  # Ctrl-C ends a watch even where the caller started us with SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return show(args.run_dirs, args.json, args.watch)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends, whether it lands in the sleep or in a redraw.
        return ExitCode.OK if args.watch else ExitCode.INTERRUPTED


def show(run_dirs: list[str], as_json: bool, watch: float | None) -> int:
    while True:
        statuses = collect_status(run_dirs)
        if as_json:
            for status in statuses:
                print(json.dumps(status.to_json()))
        else:
            if watch:
                print("\033[2J\033[H", end="")
            print(format_table(statuses), flush=True)
        if not watch:
            return ExitCode.OK
        time.sleep(watch)


if __name__ == "__main__":
    sys.exit(main())
