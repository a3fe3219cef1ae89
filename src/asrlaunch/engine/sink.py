"""Where every figure of a rank goes, from one call: its JSONL log, the experiment trackers and the console.

`MetricsSink.train(...)` closes the logging window (metrics.py), writes this rank's `train` record, and sends
the run's loss (the mean over ranks, one all-reduce per window: every rank calls it) with the other figures to
the trackers and to the console line (rank 0). `eval` and `event` do the same for evaluations and meta events.
The console is a tqdm bar on a terminal and plain lines in batch logs (rank 0 only).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from asrlaunch.core.logs import RankLog
from asrlaunch.core.records import Event, Kind
from asrlaunch.engine.metrics import TrainMetrics
from asrlaunch.engine.tracking import Tracking
from asrlaunch.job.heartbeat import waiting

HIDDEN_ON_CONSOLE = ("rank", "attempt", "time", "sample_ids", "kind")


class Console:
    """A tqdm bar on a terminal, plain lines in batch logs; rank 0 only."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def line(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        shown = {k: v for k, v in record.items() if k not in HIDDEN_ON_CONSOLE}
        text = f"[{record['kind']}] " + " ".join(f"{k}={v}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsSink:
    def __init__(
        self, log: RankLog, window: TrainMetrics, tracking: Tracking, console: Console, accelerator: Any
    ) -> None:
        self.log, self.window, self.tracking, self.console = log, window, tracking, console
        self.accelerator = accelerator

    def step_done(self, loss: Any, seconds: float, compute_s: Any) -> None:
        self.window.step_done(loss, seconds, compute_s)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (evaluation, checkpoints)."""
        with self.window.paused():
            yield

    def run_mean(self, value: float) -> float:
        """The mean over ranks of a figure every rank has (the run's loss, as the collector reports it)."""
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        with waiting():
            return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def train(self, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        figures = self.window.flush()
        run_loss = round(self.run_mean(figures["loss"]), 6)
        record = self.log.write(Kind.TRAIN, step, epoch, **figures, run_loss=run_loss, **fields)
        names = ("lr", "grad_norm", "samples_per_s")
        self.tracking.log({"train/loss": run_loss, **{f"train/{n}": record[n] for n in names}}, step)
        self.console.line({**record, "loss": run_loss})
        return record

    def eval(self, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        record = self.log.write(Kind.EVAL, step, epoch, **fields)
        self.tracking.log({"eval/loss": record["eval_loss"], "eval/wer": record["wer"]}, step)
        self.console.line(record)
        return record

    def event(self, event: Event, step: int, epoch: float, **fields: Any) -> dict[str, Any]:
        return self.log.event(event, step, epoch, **fields)

    def advance(self, step: int) -> None:
        self.console.advance(step)

    def close(self) -> None:
        self.console.close()
        self.tracking.close()
        self.log.close()
