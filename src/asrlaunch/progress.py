"""Progress for people: a tqdm bar on a terminal, plain lines in batch logs (rank 0 only). No torch."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, record: dict[str, Any] | None) -> None:
        if not self.enabled or record is None:
            return
        shown = {
            k: v for k, v in record.items() if k not in ("rank", "attempt", "time", "sample_ids", "kind")
        }
        line = f"[{record['kind']}] " + " ".join(f"{k}={v}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
