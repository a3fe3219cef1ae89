"""Where a prepared table is built: a folder of its own beside the cache entry, renamed to the entry when
complete, so that no reader ever sees half a table, and several ranks or nodes may build at once. A build
that is killed leaves its folder, as large as its corpus; the next preparation on that host removes it."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"  # <entry>.partial-<host>-<pid>: nodes share the cache
LOCK = ".building"  # inside a partial folder: locked (flock) by its builder until the folder is renamed
# <name>.removing-<host>-<pid>: an entry renamed out of the cache's way, being deleted
REMOVING = ".removing-"
# A folder younger than this may be between its creation and its builder's lock: never taken for abandoned.
MIN_ABANDONED_AGE_S = 60.0


@contextmanager
def building(entry: Path) -> Iterator[Path]:
    """A private folder to build `entry` in, locked while the block runs; renamed to `entry` when the block
    ends, removed when it raises. Where another process renamed its own first, ours is dropped: the same
    table, built from the same key."""
    partial = entry.with_name(f"{entry.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # this process's own attempt that raised before it cleaned up
    partial.mkdir(parents=True)
    with open(partial / LOCK, "w") as lock:
        try_lock(lock.fileno())  # where the file system has no locks, the folder is never removed for us
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            partial.rename(entry)  # the lock stays held until the folder has its final name
        except OSError:  # another rank finished first: its table is as good as ours
            shutil.rmtree(partial, ignore_errors=True)
        else:
            (entry / LOCK).unlink(missing_ok=True)


def try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live builder, or no locks on this file system
        return False
    return True


def remove_abandoned_builds(cache_dir: Path) -> list[Path]:
    """Remove this host's partial folders whose builder is gone (a killed preparation, a node's job that
    ended mid-build): the lock a builder holds dies with its process, whatever its pid namespace. Another
    host's folders stay (a node-local lock says nothing there), and so does one whose lock is held: a live
    or suspended build. Removals that were stopped midway are finished."""
    removed = []
    for path in sorted({*cache_dir.glob(f"*{PARTIAL}*"), *cache_dir.glob(f"*{REMOVING}*")}):
        if REMOVING in path.name:
            doomed = path if old_enough(path) else None
        else:
            doomed = take_over(path) if is_abandoned(path) else None
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def is_abandoned(partial: Path) -> bool:
    """A partial folder of this host, old enough to hold its lock, whose lock can be taken."""
    host = partial.name.rpartition(PARTIAL)[2].rpartition("-")[0]
    return host == socket.gethostname() and old_enough(partial) and builder_gone(partial / LOCK)


def take_over(partial: Path) -> Path | None:
    """Rename an abandoned build out of the way while holding its lock, so that no builder comes back to it
    in between; the new path, or None where its lock is held or the rename fails."""
    try:
        descriptor: int | None = os.open(partial / LOCK, os.O_RDWR)
    except FileNotFoundError:  # a build from before the lock, or one whose removal deleted it first
        descriptor = None
    except OSError:
        return None
    try:
        if descriptor is not None and not try_lock(descriptor):
            return None
        doomed = being_removed(partial)
        partial.rename(doomed)
        return doomed
    except OSError:
        return None
    finally:
        if descriptor is not None:
            os.close(descriptor)


def being_removed(path: Path) -> Path:
    """Where a removal renames an entry before it deletes it."""
    return path.with_name(f"{path.name}{REMOVING}{socket.gethostname()}-{os.getpid()}")


def old_enough(partial: Path) -> bool:
    try:
        return time.time() - partial.stat().st_mtime >= MIN_ABANDONED_AGE_S
    except OSError:  # renamed or removed as we looked
        return False


def builder_gone(lock: Path) -> bool:
    try:
        descriptor = os.open(lock, os.O_RDWR)  # writable: NFS's emulated flock is a write lock
    except FileNotFoundError:  # a build from before the lock, or one whose removal deleted it first
        return True
    except OSError:
        return False
    try:
        return try_lock(descriptor)
    finally:
        os.close(descriptor)
