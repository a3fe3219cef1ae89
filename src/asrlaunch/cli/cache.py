"""What a corpus cache holds, and removing what has not been used for a while.

    asrlaunch cache                               # the default cache (~/.cache/asrlaunch/prepared)
    asrlaunch cache /scratch/asr-cache --json     # another one (a recipe's data.cache_dir)
    asrlaunch cache --remove-idle-days 30         # tables not read for 30 days, and killed builds' remains

A table's last use is the last time a run read it. A build in progress is never removed; a killed one is, by
this command or the next preparation, on the host that ran it. A run still reading a removed table keeps it
(memory-mapped) until it ends; a later run prepares it anew. Never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.data.cache import CacheEntry, EntryKind, human_size, removable, remove, scan_cache
from asrlaunch.data.prepare import default_cache_dir


def days(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of days, 0 or more (e.g. 30)")
    return value


def describe(entry: CacheEntry, now: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    size, idle = human_size(entry.size_bytes), f"{entry.idle_days(now):.0f} d"
    line = f"{entry.path.name:<44} {entry.kind:<9} {size:>10}  {when} ({idle})"
    if entry.kind is EntryKind.BUILD:
        line += (
            "  abandoned: its builder is gone"
            if entry.abandoned
            else "  a build (running, or another host's)"
        )
    return line


def summary(cache_dir: Path, entries: list[CacheEntry]) -> str:
    counts = {kind: sum(e.kind is kind for e in entries) for kind in EntryKind}
    shown = ", ".join(f"{count} {kind}(s)" for kind, count in counts.items() if count)
    total = human_size(sum(e.size_bytes for e in entries))
    return f"{cache_dir}: {shown or 'empty'}, {total}"


def remove_idle(cache_dir: Path, entries: list[CacheEntry], idle_days: float, now: float) -> int:
    chosen = [entry for entry in entries if removable(entry, idle_days, now)]
    removed = [entry for entry in chosen if remove(entry)]
    for entry in removed:
        print(
            f"removed {entry.path.name} ({human_size(entry.size_bytes)}, {entry.idle_days(now):.0f} d idle)"
        )
    print(f"freed {human_size(sum(entry.size_bytes for entry in removed))} in {cache_dir}")
    if len(removed) < len(chosen):
        kept = ", ".join(entry.path.name for entry in chosen if entry not in removed)
        error(f"could not remove {kept} (permissions: their owner can)")
        return ExitCode.FAILED
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cache_dir", nargs="?", type=Path, help="a cache folder (default: the default cache)")
    parser.add_argument(
        "--remove-idle-days",
        type=days,
        metavar="DAYS",
        help="remove what no run has read for more than DAYS days, and abandoned builds",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per entry")
    args = parser.parse_args(argv)
    clean_warnings()
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache_dir is not None and not cache_dir.is_dir():
        error(f"{cache_dir}: not a folder (a corpus cache: a recipe's data.cache_dir)")
        return ExitCode.USAGE
    entries, now = scan_cache(cache_dir), time.time()
    if args.remove_idle_days is not None:
        return remove_idle(cache_dir, entries, args.remove_idle_days, now)
    if args.json:
        for entry in entries:
            print(json.dumps(entry.to_dict()))
        return ExitCode.OK
    print(summary(cache_dir, entries))
    for entry in entries:
        print(describe(entry, now))
    return ExitCode.OK
