"""What every command-line entry point shares: warnings and errors as one clean line. No torch."""

from __future__ import annotations

import sys
import warnings
from typing import TextIO


def _show(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def clean_warnings() -> None:
    """`warning: <message>` on stderr, without Python's source location and code line: a user of the command
    needs what happened and what to do, not where in our code it was noticed."""
    warnings.showwarning = _show


def error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
