"""Per-rank JSON-lines logs: the record schema, an appending writer and a tolerant reader. No torch.

Every record carries `kind` ("meta", "train", "eval"), `step`, `epoch`, `rank`, `attempt` and `time`.
train: loss, lr, grad_norm, samples_per_s (+ nonfinite_skipped, sample_ids when asked for)
eval:  eval_loss, wer, eval_samples (rank 0 only)
meta:  world_size, plan, versions, recipe, resumed_from (at every start of every attempt)
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

KINDS = ("meta", "train", "eval")
REQUIRED = ("kind", "step", "epoch", "rank", "attempt", "time")


def slurm_restart_count() -> int:
    """SLURM_RESTART_COUNT is unset on a job's first run, then 1, 2, 3 after each requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def next_attempt(log: Path) -> int:
    """The attempt number of a new start: one more than any in the log (a resubmitted job's restart count
    starts again at 0), and never less than SLURM's restart count."""
    seen = [r["attempt"] for r in read_records(log) if r["kind"] == "meta"] if log.exists() else []
    return max(slurm_restart_count(), max(seen) + 1 if seen else 0)


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank{rank}.jsonl"


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

    def __init__(self, run_dir: str | Path, rank: int, attempt: int | None = None) -> None:
        self.path = rank_log_path(run_dir, rank)
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


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of one log file. A torn line (a writer killed mid-line; later attempts append after it) is
    skipped with a warning naming it."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as file:
        lines = file.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else "line"
            warnings.warn(f"{path}:{number}: skipping a truncated {where} {line[:60]!r}", stacklevel=2)
            continue
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)}")
        yield record


def read_run_logs(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of all ranks of a run, in file order per rank."""
    files = sorted((Path(run_dir) / "logs").glob("rank*.jsonl"))
    return [record for path in files for record in read_records(path)]
