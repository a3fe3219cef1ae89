"""What a corpus cache holds, and the removal of what has not been used for a while: every change to a corpus,
its transcripts or the checks is a new table beside the old ones, so a shared cache only grows. A table's last
use is its folder's modification time, which every run that reads it sets (`mark_used`). No torch."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from asrlaunch.data.building import PARTIAL, is_abandoned

DAY_S = 86400.0


class EntryKind(StrEnum):
    TABLE = "table"  # <split>-<key>/: a prepared split, memory-mapped by every run that uses it
    PROCESSOR = "processor"  # processor-<vocabulary hash>/: the tokenizer and feature extractor
    BUILD = "build"  # <split>-<key>.partial-<host>-<pid>/: a table being built, or a killed build's remains
    REPORT = "report"  # bad-utterances-<hash>.tsv: the list of a corpus's bad utterances


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: EntryKind
    size_bytes: int
    last_used: float  # seconds since the epoch
    abandoned: bool = False  # a build of this host whose builder is gone (only this host can tell)

    def idle_days(self, now: float) -> float:
        return max(0.0, (now - self.last_used) / DAY_S)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "kind": str(self.kind)}


def mark_used(entry: Path) -> None:
    """Record a read of a table (its folder's time), for `asrlaunch cache --remove-idle-days`."""
    with contextlib.suppress(OSError):  # a cache this user may read but not write: its owner keeps it
        os.utime(entry)


def scan_cache(cache_dir: Path) -> list[CacheEntry]:
    """Every entry of the cache, largest first."""
    entries = []
    for path in cache_dir.iterdir() if cache_dir.is_dir() else []:
        kind = entry_kind(path)
        if kind is None:
            continue
        try:
            last_used = path.stat().st_mtime
        except OSError:  # renamed or removed as we looked
            continue
        abandoned = kind is EntryKind.BUILD and is_abandoned(path)
        entries.append(CacheEntry(path, kind, size_of(path), last_used, abandoned))
    return sorted(entries, key=lambda entry: (-entry.size_bytes, entry.path.name))


def entry_kind(path: Path) -> EntryKind | None:
    name = path.name
    if PARTIAL in name and path.is_dir():
        return EntryKind.BUILD
    if name.startswith("processor-") and path.is_dir():
        return EntryKind.PROCESSOR
    if name.startswith("bad-utterances-") and name.endswith(".tsv"):
        return EntryKind.REPORT
    if (path / "table.arrow").exists():
        return EntryKind.TABLE
    return None  # not ours (a temporary file being renamed, something a user put there)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def removable(entry: CacheEntry, idle_days: float, now: float) -> bool:
    """Idle for longer than `idle_days` (a build only when abandoned: a running one is never idle)."""
    if entry.kind is EntryKind.BUILD:
        return entry.abandoned
    return entry.idle_days(now) > idle_days


def remove(entry: CacheEntry) -> bool:
    """Remove the entry; whether it is gone."""
    if entry.path.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)
    return not entry.path.exists()


def human_size(size_bytes: float) -> str:
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
