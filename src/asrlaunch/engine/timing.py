"""Step timing without making the host wait for the device: on a GPU, CUDA events read when the logging
window closes; on a CPU, the host's clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class ComputeTime:
    """The summed duration of a step's timed spans, resolved on `float()` (one device sync per window)."""

    def __init__(self, seconds: float, events: list[tuple[Any, Any]]) -> None:
        self.seconds, self.events = seconds, events

    def __float__(self) -> float:
        return self.seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000.0


class ComputeClock:
    """This rank's own work in a step: the spans measured inside `span()` (its data, forward passes, and
    backward passes that do not synchronise gradients), so waiting for other ranks in the all-reduce is left
    out."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds, self._events = 0.0, []  # type: tuple[float, list[tuple[Any, Any]]]

    @contextmanager
    def span(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        started = time.perf_counter()
        yield
        self._seconds += time.perf_counter() - started

    def take(self) -> ComputeTime:
        """The step's compute time so far; the clock starts anew."""
        taken = ComputeTime(self._seconds, self._events)
        self._seconds, self._events = 0.0, []
        return taken
