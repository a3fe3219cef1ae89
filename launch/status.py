"""Where are my runs? SLURM state, nodes, elapsed time, restarts, and step/loss/WER/ETA from the logs.

    python launch/status.py runs/smoke [more run dirs or sweep roots ...] [--watch [SECONDS]] [--json]

Never imports torch: it answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from asrlaunch.cli import clean_warnings, error
from asrlaunch.rundir import RunDir
from asrlaunch.status import collect_status, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories, or a sweep's root")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=5.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5) until interrupted",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    clean_warnings()
    if args.watch:  # Ctrl-C ends a watch even where the caller started us with SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return show(args.run_dirs, args.json, args.watch)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends, whether it lands in the sleep or in a redraw.
        return 0 if args.watch else 130


def show(run_dirs: list[str], as_json: bool, watch: float | None) -> int:
    while True:
        statuses = collect_status(run_dirs)
        if not statuses:
            error(f"no run directory (with {RunDir(Path()).recipe.name}) in {' '.join(run_dirs)}")
            return 2
        if as_json:
            for status in statuses:
                print(json.dumps(status.to_json()))
        else:
            if watch:
                print("\033[2J\033[H", end="")
            print(format_table(statuses), flush=True)
        if not watch:
            return 0
        time.sleep(watch)


if __name__ == "__main__":
    sys.exit(main())
