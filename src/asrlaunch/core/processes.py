"""Whether a process of this host still runs, read from /proc (no psutil on the launcher's side)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """A process of this host has that id and has not ended: a zombie (ended, not yet reaped by its parent)
    counts as ended."""
    if not proc.is_dir():  # no /proc (macOS): signal 0 tells, counting a zombie as running
        return signal_reaches(pid)
    try:
        state = (proc / str(pid) / "stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def signal_reaches(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_command(pid: int, proc: Path = Path("/proc")) -> list[bytes]:
    """The process's command line, empty when it is gone."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
