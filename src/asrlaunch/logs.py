"""Per-rank JSON-lines logs: the record schema, an appending writer and the one reader. No torch.

Every record carries `kind` ("meta", "train", "eval"), `step` (optimizer steps done), `epoch`, `rank`,
`attempt` and `time` (unix seconds). Non-finite numbers are written as null (strict JSON).
meta, at every start:  world_size, plan, versions, recipe, device, resumed_from, job_id, slurm_restart_count,
                       nodes, host
meta, at a stop:       event (timeout, preemption, signal, failure, oom_split, checkpoint_error) and what
                       the event says about itself (requeued, rank, exit status, the new plan, ...)
train:                 loss, lr, grad_norm, samples_per_s, nonfinite_skipped, ctc_infinite
                       (+ max_memory_gib on a GPU, sample_ids when asked for)
eval (rank 0 only):    eval_loss, wer, eval_samples
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

from asrlaunch.rundir import RunDir

KINDS = ("meta", "train", "eval")
REQUIRED = ("kind", "step", "epoch", "rank", "attempt", "time")
TAIL_BYTES = 64 * 1024


def slurm_restart_count() -> int:
    """SLURM_RESTART_COUNT is unset on a job's first run, then 1, 2, 3 after each requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def is_start(record: dict[str, Any]) -> bool:
    """The meta record a rank writes when it starts (stop events are meta records too)."""
    return record["kind"] == "meta" and not record.get("event")


def next_attempt(run_dir: RunDir) -> int:
    """The attempt number of a new start: one more than any in rank 0's log (a resubmitted job's restart
    count starts again at 0), and never less than SLURM's restart count."""
    seen = [r["attempt"] for r in meta_records(run_dir.rank_log(0))]
    return max(slurm_restart_count(), max(seen) + 1 if seen else 0)


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

    def __init__(self, run_dir: str | Path | RunDir, rank: int, attempt: int | None = None) -> None:
        self.path = (run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))).rank_log(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.attempt = slurm_restart_count() if attempt is None else attempt
        torn = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
        self._file: TextIO = self.path.open("a", encoding="utf-8")
        if torn:  # a writer killed mid-line: end its torn line, start ours on a new one
            self._file.write("\n")

    def write(self, kind: str, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"record kind {kind!r} is not one of {', '.join(KINDS)}")
        record = {
            "kind": kind,
            "step": step,
            "epoch": round(epoch, 4),
            "rank": self.rank,
            "attempt": self.attempt,
            "time": round(time.time(), 3),
            **fields,
        }
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()
        return record

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


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of one log file. A torn line (a writer killed mid-line; later attempts append after it) is
    skipped with a warning naming it."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as file:
        lines = file.readlines()
    yield from _parse(lines, path)


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
            candidates = [line.decode(errors="replace") for line in file if b'"meta"' in line]
    except OSError:
        return []
    return [record for record in _parse(candidates, path, warn=False) if record["kind"] == "meta"]
