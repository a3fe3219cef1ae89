"""What a corpus cache holds, and removing what no run has used for a while.

    asrlaunch cache                                    # the default cache (~/.cache/asrlaunch/prepared)
    asrlaunch cache /scratch/asr-cache --json          # another one (a recipe's data.cache_dir)
    asrlaunch cache --remove-idle-days 30 --dry-run    # what the removal would take, and free
    asrlaunch cache --remove-idle-days 30              # take it

An entry (a prepared table, a processor, a bad-utterance report) is used when a run reads it: at its start
and at each checkpoint. The removal takes the entries idle for more than DAYS days, the remains of builds
killed on this host (a running or suspended build is never taken), and removals stopped midway; each entry
is renamed out of the way before it is deleted, so no run sees half of one. On a local disk a run still
reading a removed table keeps it until it ends; on NFS, ranks on other nodes lose it: choose DAYS longer
than any run, and a run's queue wait, lasts. Never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from asrlaunch.core.console import clean_warnings, error
from asrlaunch.core.exits import ExitCode
from asrlaunch.data.cache import CacheEntry, EntryKind, human_size, removable, remove, scan_cache
from asrlaunch.data.prepare import default_cache_dir


def days(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of days, 1 or more (e.g. 30)")
    return value


def describe(entry: CacheEntry, now: float, width: int) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    size, idle = human_size(entry.size_bytes), f"{entry.idle_days(now):.0f} d"
    return f"{entry.path.name:<{width}}  {entry.kind:<9} {size:>10}  {when} ({idle}){note(entry)}"


def note(entry: CacheEntry) -> str:
    if entry.kind is EntryKind.REMOVING:
        return "  a removal stopped midway: the next one finishes it"
    if entry.kind is EntryKind.BUILD:
        return (
            "  abandoned: its builder is gone"
            if entry.abandoned
            else "  a build (running, or another host's)"
        )
    return ""


def summary(cache_dir: Path, entries: list[CacheEntry]) -> str:
    counts = {kind: sum(e.kind is kind for e in entries) for kind in EntryKind}
    shown = ", ".join(f"{count} {kind}(s)" for kind, count in counts.items() if count)
    total = human_size(sum(e.size_bytes for e in entries))
    return f"{cache_dir}: {shown or 'empty'}, {total}"


def remove_idle(cache_dir: Path, chosen: list[CacheEntry], now: float, as_json: bool) -> int:
    """Remove the chosen entries; one line (or JSON object) each, then what was freed, and the errors."""
    problems = {entry.path: remove(entry) for entry in chosen}
    removed = [entry for entry in chosen if problems[entry.path] is None]
    report(removed, now, as_json, "removed")
    if not as_json:
        print(f"freed {human_size(sum(entry.size_bytes for entry in removed))} in {cache_dir}")
    if failed := [problem for problem in problems.values() if problem is not None]:
        error("\n".join(f"could not remove {problem}" for problem in failed))
        return ExitCode.FAILED
    return ExitCode.OK


def report(entries: list[CacheEntry], now: float, as_json: bool, verb: str) -> None:
    for entry in entries:
        if as_json:
            print(json.dumps({**entry.to_dict(), "action": verb}))
        else:
            size, idle = human_size(entry.size_bytes), entry.idle_days(now)
            print(f"{verb} {entry.path.name} ({entry.kind}, {size}, {idle:.0f} d idle)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asrlaunch cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cache_dir", nargs="?", type=Path, help="a cache folder (default: the default cache)")
    parser.add_argument(
        "--remove-idle-days",
        type=days,
        metavar="DAYS",
        help="remove what no run has used for more than DAYS days (1 or more), and abandoned builds",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="with --remove-idle-days: what it would remove, kept"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per entry")
    args = parser.parse_args(argv)
    clean_warnings()
    if args.dry_run and args.remove_idle_days is None:
        parser.error("--dry-run previews --remove-idle-days DAYS: give both")
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache_dir is not None and not cache_dir.is_dir():
        error(f"{cache_dir}: not a folder (a corpus cache: a recipe's data.cache_dir)")
        return ExitCode.USAGE
    entries, now = scan_cache(cache_dir), time.time()
    if args.remove_idle_days is not None:
        chosen = [entry for entry in entries if removable(entry, args.remove_idle_days, now)]
        if args.dry_run:
            report(chosen, now, args.json, "would remove")
            size = human_size(sum(entry.size_bytes for entry in chosen))
            print(f"would free {size} in {cache_dir}", file=sys.stderr if args.json else sys.stdout)
            return ExitCode.OK
        return remove_idle(cache_dir, chosen, now, args.json)
    if args.json:
        for entry in entries:
            print(json.dumps(entry.to_dict()))
        return ExitCode.OK
    print(summary(cache_dir, entries))
    width = max((len(entry.path.name) for entry in entries), default=0)
    for entry in entries:
        print(describe(entry, now, width))
    return ExitCode.OK
