"""The logging window of a rank: step losses since the last train record, training throughput and peak memory.

samples/s counts the steps this process trained since the window opened (a resumed window may hold losses of
the attempt before, which it did not train) over training time only: evaluation and checkpoints run inside
`paused()`. Step losses may be device tensors: they are read back once, when the window is flushed, so that
no training step waits for the device. No torch import here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def to_floats(values: list[Any]) -> list[float]:
    """Python floats of numbers and 0-d tensors, with one device transfer for all the tensors."""
    tensors = [i for i, v in enumerate(values) if hasattr(v, "detach")]
    if not tensors:
        return [float(v) for v in values]
    import torch

    read = torch.stack([values[i].detach().double() for i in tensors]).cpu().tolist()
    out = list(values)
    for i, value in zip(tensors, read, strict=True):
        out[i] = value
    return [float(v) for v in out]


class TrainMetrics:
    def __init__(self, global_batch: int, peak_memory: Callable[[], dict[str, float]] = dict) -> None:
        self.global_batch = global_batch
        self.peak_memory = peak_memory
        self.window: list[Any] = []
        self._trained_steps = 0
        self._opened = time.perf_counter()

    def step_done(self, loss: Any) -> None:
        self.window.append(loss)
        self._trained_steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time (evaluation, checkpoints)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._opened += time.perf_counter() - started

    def flush(self) -> dict[str, Any]:
        """The train record's figures for the window, which then starts anew."""
        losses = to_floats(self.window)
        elapsed = time.perf_counter() - self._opened
        figures = {
            "loss": round(float(np.mean(losses)), 6) if losses else float("nan"),
            "samples_per_s": round(self._trained_steps * self.global_batch / elapsed, 3),
            **self.peak_memory(),
        }
        self.window, self._trained_steps, self._opened = [], 0, time.perf_counter()
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"loss_window": to_floats(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = [float(v) for v in state.get("loss_window", [])]
