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
    """`error: ...`, one line per problem (a message of several problems gives several lines)."""
    lines = str(message).splitlines() or [""]
    print(
        "\n".join(f"error: {line}" if line[:1] not in (" ", "(") else line for line in lines),
        file=sys.stderr,
        flush=True,
    )
