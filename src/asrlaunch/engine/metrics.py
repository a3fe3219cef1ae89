"""The logging window of a rank: step losses since the last train record, step and compute times, training
throughput and peak memory.

samples/s counts the steps this process trained since the window opened (a resumed window may hold losses of
the attempt before, which it did not train) over training time only: evaluation and checkpoints run inside
`paused()`. Step losses may be device tensors: they are read back once, when the window is flushed, so that
no training step waits for the device. A step loss that is not finite is logged as the Trainer of the
reference card logged it (`logging_nan_inf_filter`, see `window_loss`). No torch import here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
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


def window_loss(losses: Sequence[float]) -> float:
    """The mean loss of a logging window, as transformers' Trainer (4.15, `logging_nan_inf_filter` on by
    default) logs it: a step whose loss is NaN or infinite adds the mean of the window so far,
    `total / (1 + steps before it in the window)`, instead of its own value (0 for the first step)."""
    total = 0.0
    for before, loss in enumerate(losses):
        total += loss if math.isfinite(loss) else total / (1 + before)
    return total / len(losses)


class TrainMetrics:
    def __init__(self, global_batch: int, peak_memory: Callable[[], dict[str, float]] = dict) -> None:
        self.global_batch = global_batch
        self.peak_memory = peak_memory
        self.window: list[Any] = []
        self._step_s: list[Any] = []
        self._compute_s: list[Any] = []
        self._trained_steps = 0
        self._opened = time.perf_counter()

    def open(self) -> None:
        """Training starts now: the time before (loading a checkpoint, setting up) is start-up, which goodput
        counts apart, not the first window's."""
        self._opened = time.perf_counter()

    def step_done(self, loss: Any, seconds: float = math.nan, compute_s: Any = math.nan) -> None:
        """`compute_s`: a number, or anything `float()` resolves (a GPU clock, read at the window's end)."""
        self.window.append(loss)
        self._step_s.append(seconds)
        self._compute_s.append(compute_s)
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
            "loss": round(window_loss(losses), 6) if losses else float("nan"),
            "samples_per_s": round(self._trained_steps * self.global_batch / elapsed, 3),
            **_medians(step_s=self._step_s, compute_s=self._compute_s),
            **self.peak_memory(),
        }
        self.window, self._step_s, self._compute_s = [], [], []
        self._trained_steps, self._opened = 0, time.perf_counter()
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"loss_window": to_floats(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = [float(v) for v in state.get("loss_window", [])]
        self._step_s, self._compute_s = [], []


def resumed_window(windows: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """The open logging window a rank resumes with. On the same world size its own; on another, every rank
    the element-wise mean of the saved ones, so that the next window's mean over ranks is still the old
    world's (each rank's loss is its share of the global batch's, a partial batch's last ranks' included)."""
    if len(windows) == world_size:
        return windows[rank]
    steps = zip(*(w.get("loss_window", []) for w in windows), strict=True)
    return {"loss_window": [sum(values) / len(values) for values in steps]}


def _medians(**series: list[Any]) -> dict[str, float]:
    """The median of each series over the steps this process timed (a resumed window's replayed steps were
    not timed here)."""
    out = {}
    for name, values in series.items():
        timed = [x for x in map(float, values) if math.isfinite(x)]
        if timed:
            out[name] = round(float(np.median(timed)), 6)
    return out
