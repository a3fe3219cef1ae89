"""Fault injection, for tests and soak runs: `ASRLAUNCH_FAULT=<kind>@<key>=<value>,...[;<kind>@...]`.

    crash@step=30,rank=1            rank 1 kills itself (SIGKILL) when it starts step 30: a dead rank
    crash@step=10,rank=1,phase=eval     ... when it starts the evaluation after step 10 (or `checkpoint`)
    crash@step=0,phase=start        every rank dies as it starts, resuming at step 0, before it has logged a
                                    word (out of memory loading a checkpoint, a bad GPU): nothing is logged
    oom@step=5,micro=8              the last micro-batch of step 5 raises CUDA's out-of-memory error, after
                                    the others' gradients were accumulated, while the micro-batch is 8
                                    (after the split to 4 it runs): a real OOM's path
    slow@rank=1,factor=2            from `step` (default 0) on, rank 1's forward passes take twice as long: a
                                    throttled GPU, a straggler
    slow@rank=1,phase=data,seconds=0.3   ... each step's data takes 0.3 s more: a slow disk, a starved CPU
    stall@step=10,rank=0,phase=eval,seconds=60   rank 0 sleeps 60 s when it starts that phase: a long phase
                                    without a collective (a slow file system, a big evaluation)
    stall@step=0,rank=0,phase=prepare,seconds=60   rank 0 takes 60 s more to prepare the corpus (a big one)
    freeze@step=10,rank=1,phase=checkpoint   rank 1 stops itself (SIGSTOP) there: a hung GPU kernel or file
                                    system, its heartbeat thread stopped with it (the supervisor's case)

Every fault fires on every attempt that reaches it; a `fault` event is logged first (not at `start`). The
trainer calls the hooks at a step's start and at a phase's start (outside the step's own code), `oom`'s
before the step's last forward; `slow` is a forward hook on the model. Parsing is pure (no torch).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = CRASH, OOM, SLOW, STALL, FREEZE = ("crash", "oom", "slow", "stall", "freeze")
KEYS = {"step", "rank", "micro", "phase", "factor", "seconds"}
PHASES = ("step", "eval", "checkpoint", "start", "prepare", "data")
VARIABLE = "ASRLAUNCH_FAULT"
FORM = (
    f"<kind>@step=<n>[,rank=<r>][,micro=<m>][,phase={'|'.join(PHASES)}][,factor=<f>][,seconds=<s>], "
    f"several joined by ';', with kind one of {', '.join(KINDS)} (e.g. crash@step=30,rank=1)"
)


class FaultSpecError(ValueError):
    """ASRLAUNCH_FAULT does not parse; the message shows the accepted form."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    micro: int | None = None
    phase: str = "step"
    factor: float = 1.0
    seconds: float = 0.0
    text: str = ""

    def due(self, step: int, rank: int, micro: int, phase: str = "step") -> bool:
        return (
            step == self.step
            and phase == self.phase
            and (self.rank is None or rank == self.rank)
            and (self.micro is None or micro == self.micro)
        )


def parse_fault(text: str) -> Fault:
    kind, _, where = text.partition("@")
    fields: dict[str, str] = {}
    for item in filter(None, where.split(",")):
        key, _, value = item.partition("=")
        fields[key.strip()] = value.strip()
    try:
        number = {k: float(v) for k, v in fields.items() if k != "phase"}
    except ValueError:
        number = {"invalid": 0.0}
    needs_step = kind != SLOW
    if (
        kind not in KINDS
        or set(fields) - KEYS
        or "invalid" in number
        or (needs_step and "step" not in fields)
        or fields.get("phase", "step") not in PHASES
    ):
        raise FaultSpecError(f"{VARIABLE}={text!r}: expected {FORM}")
    whole = {k: int(v) for k, v in number.items() if k in ("step", "rank", "micro")}
    return Fault(
        kind,
        whole.get("step", 0),
        whole.get("rank"),
        whole.get("micro"),
        fields.get("phase", "step"),
        number.get("factor", 1.0),
        number.get("seconds", 0.0),
        text,
    )


def parse_faults(text: str) -> list[Fault]:
    return [parse_fault(part.strip()) for part in text.split(";") if part.strip()]


def planned_faults() -> list[Fault]:
    return parse_faults(os.environ.get(VARIABLE, ""))


def crash_now() -> None:
    """What a node's OOM killer or a hardware fault does to a rank: no cleanup, no last words."""
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    """The planned faults of one rank as hooks; with none planned every hook returns at once."""

    def __init__(self, faults: list[Fault], rank: int, log_fault: Callable[[Fault, int], None]) -> None:
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]
        self.rank, self.log_fault = rank, log_fault

    def __bool__(self) -> bool:
        return bool(self.faults)

    def at_step(self, step: int, micro: int) -> None:
        self._fire(step, micro, "step", set(KINDS) - {SLOW, OOM})

    def at_last_micro_batch(self, step: int, micro: int) -> None:
        self._fire(step, micro, "step", {OOM})

    def at_data(self, step: int) -> None:
        """Before a step's micro-batches are collated (or waited for)."""
        self._fire(step, 0, "data", set(KINDS) - {SLOW})
        for fault in self.faults:
            if fault.kind == SLOW and fault.phase == "data" and step >= fault.step:
                time.sleep(fault.seconds)

    def at_phase(self, phase: str, step: int) -> None:
        self._fire(step, 0, phase, set(KINDS) - {SLOW})

    def _fire(self, step: int, micro: int, phase: str, kinds: set[str]) -> None:
        for fault in self.faults:
            if fault.kind not in kinds or not fault.due(step, self.rank, micro, phase):
                continue
            if phase != "start":
                self.log_fault(fault, step)
            if fault.kind == CRASH:
                crash_now()
            elif fault.kind == STALL:
                time.sleep(fault.seconds)
            elif fault.kind == FREEZE:
                os.kill(os.getpid(), signal.SIGSTOP)
            elif fault.kind == OOM:
                import torch

                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory (injected by {VARIABLE} at step {step})"
                )

    def slow_model(self, model: Any, step_of: Callable[[], int]) -> None:
        """A straggler: each forward pass is followed by a sleep of (factor - 1) times its own duration."""
        slow = [f for f in self.faults if f.kind == SLOW and f.phase == "step"]
        if not slow:
            return
        fault, started = slow[0], [0.0]

        def before(module: Any, args: Any) -> None:
            started[0] = time.perf_counter()

        def after(module: Any, args: Any, output: Any) -> None:
            if step_of() >= fault.step:
                time.sleep((fault.factor - 1.0) * (time.perf_counter() - started[0]))

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
