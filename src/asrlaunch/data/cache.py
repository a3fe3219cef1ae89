"""A corpus cache's layout (every name in it is made here), what it holds, and the removal of what no run has
used for a while: every change to a corpus, its transcripts or the checks is a new table beside the old
ones, so a shared cache only grows. An entry's last use is its folder's modification time, which every run
that reads it sets at its start and at each checkpoint (`mark_used`). No torch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from asrlaunch.data.building import PARTIAL, REMOVING, being_removed, is_abandoned, take_over

DAY_S = 86400.0
TABLE_FILE = "table.arrow"  # inside <split>-<key>/: the prepared split, memory-mapped by every run using it
PROCESSOR_PREFIX = "processor-"  # processor-<vocabulary hash>/: the tokenizer and the feature extractor
REPORT_PREFIX, REPORT_SUFFIX = "bad-utterances-", ".tsv"  # the list of a corpus's bad utterances


def table_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / key / TABLE_FILE


def processor_dir(cache_dir: Path, vocab: dict[str, int]) -> Path:
    return cache_dir / f"{PROCESSOR_PREFIX}{hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]}"


def report_file(cache_dir: Path, body: str) -> Path:
    return cache_dir / f"{REPORT_PREFIX}{hashlib.sha256(body.encode()).hexdigest()[:12]}{REPORT_SUFFIX}"


class EntryKind(StrEnum):
    TABLE = "table"
    PROCESSOR = "processor"
    REPORT = "report"
    BUILD = "build"  # <entry>.partial-<host>-<pid>/: a table being built, or a killed build's remains
    REMOVING = "removing"  # <entry>.removing-<host>-<pid>/: a removal that was stopped before its end


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


def write_atomic(path: Path, text: str) -> None:
    """Ranks that write the same file at once must not tear it: write a private file, then rename."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_unless_equal(path: Path, text: str) -> None:
    """A cache's file written only when it is not there already: a complete cache that the user may read but
    not write (another's, or mounted read-only) is enough to run."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    write_atomic(path, text)


def mark_used(entry: Path) -> None:
    """Record a use of a table or processor (its folder's time), for `asrlaunch cache --remove-idle-days`.
    A user who may read the cache but not write it leaves no mark: its owner's removal sees the entry idle."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def scan_cache(cache_dir: Path) -> list[CacheEntry]:
    """Every entry of the cache, largest first."""
    entries = []
    for path in cache_dir.iterdir() if cache_dir.is_dir() else []:
        kind = entry_kind(path)
        try:
            last_used = path.stat().st_mtime
        except OSError:  # renamed or removed as we looked
            continue
        if kind is not None:
            abandoned = kind is EntryKind.BUILD and is_abandoned(path)
            entries.append(CacheEntry(path, kind, size_of(path), last_used, abandoned))
    return sorted(entries, key=lambda entry: (-entry.size_bytes, entry.path.name))


def entry_kind(path: Path) -> EntryKind | None:
    name = path.name
    if not path.is_dir():
        is_report = name.startswith(REPORT_PREFIX) and name.endswith(REPORT_SUFFIX)
        return EntryKind.REPORT if is_report else None
    if REMOVING in name:
        return EntryKind.REMOVING
    if PARTIAL in name:
        return EntryKind.BUILD
    if name.startswith(PROCESSOR_PREFIX):
        return EntryKind.PROCESSOR
    return EntryKind.TABLE if (path / TABLE_FILE).exists() else None  # else not ours: left alone


def size_of(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]:
        for name in files:
            with contextlib.suppress(OSError):  # removed as we looked
                total += os.stat(os.path.join(folder, name)).st_size
    return total


def removable(entry: CacheEntry, idle_days: float, now: float) -> bool:
    """Idle for longer than `idle_days`; a build only when abandoned (a running one is never idle), and a
    stopped removal always."""
    if entry.kind is EntryKind.BUILD:
        return entry.abandoned
    return entry.kind is EntryKind.REMOVING or entry.idle_days(now) > idle_days


def remove(entry: CacheEntry) -> str | None:
    """Rename the entry out of the cache's way first (a run never sees half an entry, and a removal stopped
    midway is finished by the next one), then delete it; what went wrong, if anything."""
    try:
        if not entry.path.is_dir():
            entry.path.unlink(missing_ok=True)
            return None
        doomed = out_of_the_way(entry)
    except OSError as problem:
        return str(problem)
    if doomed is None:
        return f"{entry.path}: its builder runs again"
    errors: list[str] = []

    def note(_: object, path: str, info: tuple[type, BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):  # another removal of the same took it first
            errors.append(f"{path}: {info[1]}")

    shutil.rmtree(doomed, onerror=note)
    return errors[0] if errors else None


def out_of_the_way(entry: CacheEntry) -> Path | None:
    if entry.kind is EntryKind.BUILD:
        return take_over(entry.path)  # with the builder's lock: it cannot have come back
    if entry.kind is EntryKind.REMOVING:
        return entry.path
    doomed = being_removed(entry.path)
    entry.path.rename(doomed)
    return doomed


def human_size(size_bytes: float) -> str:
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
