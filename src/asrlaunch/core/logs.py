"""Per-rank JSON-lines logs: an appending writer that checks each record against the schema (records.py), and
the one reader (whole, tail, meta records only). No torch.

Every record carries the common fields (`kind`, `step`, `epoch`, `rank`, `attempt`, `time`); records.py
defines the rest. Non-finite numbers are written as null (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from asrlaunch.core.records import COMMON, Event, Kind, allowed_fields
from asrlaunch.core.rundir import RunDir

REQUIRED = tuple(field.name for field in COMMON)
TAIL_BYTES = 64 * 1024
META_BYTES = f'"{Kind.META.value}"'.encode()  # cheap pre-filter before parsing a line


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON, readable by jq and every other parser (not only Python's)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class RankLog:
    """Appends one JSON object per line and flushes it, so a killed job loses at most one line."""

    def __init__(self, run_dir: str | Path | RunDir, rank: int, attempt: int) -> None:
        self.path = (run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))).rank_log(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.attempt = rank, attempt
        torn = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
        self._file: TextIO = self.path.open("a", encoding="utf-8")
        if torn:  # a writer killed mid-line: end its torn line, start ours on a new one
            self._file.write("\n")

    def write(
        self, kind: Kind, step: int, epoch: float, event: Event | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One record; a field the schema does not define for this kind and event is a bug, refused."""
        if kind not in set(Kind):
            raise ValueError(f"record kind {kind!r} is not one of {', '.join(k.value for k in Kind)}")
        kind = Kind(kind)
        unknown = set(fields) - allowed_fields(kind, event)
        if unknown:
            what = f"{kind} {event or 'start'}" if kind is Kind.META else str(kind)
            raise ValueError(f"a {what} record has no field {', '.join(sorted(unknown))} (see records.py)")
        record = {
            "kind": kind.value,
            "step": step,
            "epoch": round(epoch, 4),
            "rank": self.rank,
            "attempt": self.attempt,
            "time": round(time.time(), 3),
            **({"event": Event(event).value} if event is not None else {}),
            **fields,
        }
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()
        return record

    def start(self, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        return self.write(Kind.META, step, epoch, **fields)

    def event(self, event: Event, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        return self.write(Kind.META, step, epoch, event=event, **fields)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RankLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(
    lines: list[str], path: Path, first_number: int = 1, warn: bool = True
) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=first_number):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if warn:
                where = "last line" if number == first_number + len(lines) - 1 else "line"
                warnings.warn(f"{path}:{number}: skipping a truncated {where} {line[:60]!r}", stacklevel=3)
            continue
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)}")
        yield record


def read_records(path: str | Path, warn: bool = True) -> Iterator[dict[str, Any]]:
    """Records of one log file. A torn line (a writer killed mid-line; later attempts append after it) is
    skipped with a warning naming it (`warn=False`: quietly, for readers of a log being written)."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as file:
        lines = file.readlines()
    yield from _parse(lines, path, warn=warn)


def read_run_logs(run_dir: str | Path | RunDir) -> list[dict[str, Any]]:
    """All records of all ranks of a run, in file order per rank."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    return [record for path in run.rank_logs().values() for record in read_records(path)]


def tail_records(path: Path, size: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records in the last `size` bytes of a log (a partial first or last line is dropped quietly)."""
    try:
        with path.open("rb") as file:
            end = file.seek(0, os.SEEK_END)
            file.seek(max(0, end - size))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return list(_parse(lines[1:] if end > size else lines, path, warn=False))


def meta_records(path: Path) -> list[dict[str, Any]]:
    """The meta records of a log: starts and stop events. Every candidate line is parsed (no reliance on key
    order); lines that cannot hold a meta record are not decoded at all."""
    try:
        with path.open("rb") as file:
            candidates = [line.decode(errors="replace") for line in file if META_BYTES in line]
    except OSError:
        return []
    return [record for record in _parse(candidates, path, warn=False) if record["kind"] == Kind.META]
