"""Fault injection, for tests and soak runs: `ASRLAUNCH_FAULT=<kind>@step=<n>[,rank=<r>][,micro=<m>]`.

    crash@step=30,rank=1   rank 1 kills itself (SIGKILL) when it starts step 30: a dead rank, every attempt
    oom@step=5,micro=8     the first micro-batch of step 5 raises CUDA's out-of-memory error while the
                           micro-batch is 8 (after the split to 4 it runs): the path a real OOM takes

Parsing is pure (no torch); the trainer asks `fault.due(step, rank, micro)` at each step.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KINDS = ("crash", "oom")
VARIABLE = "ASRLAUNCH_FAULT"


class FaultSpecError(ValueError):
    """ASRLAUNCH_FAULT does not parse; the message shows the accepted form."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    micro: int | None = None

    def due(self, step: int, rank: int, micro: int) -> bool:
        return (
            step == self.step
            and (self.rank is None or rank == self.rank)
            and (self.micro is None or micro == self.micro)
        )


def parse_fault(text: str) -> Fault:
    kind, _, where = text.partition("@")
    fields: dict[str, int] = {}
    try:
        for item in filter(None, where.split(",")):
            key, _, value = item.partition("=")
            fields[key.strip()] = int(value)
    except ValueError:
        fields = {}
    if kind not in KINDS or "step" not in fields or set(fields) - {"step", "rank", "micro"}:
        raise FaultSpecError(
            f"{VARIABLE}={text!r}: expected <kind>@step=<n>[,rank=<r>][,micro=<m>] with kind one of "
            f"{', '.join(KINDS)} (e.g. crash@step=30,rank=1)"
        )
    return Fault(kind, fields["step"], fields.get("rank"), fields.get("micro"))


def planned_fault() -> Fault | None:
    text = os.environ.get(VARIABLE, "").strip()
    return parse_fault(text) if text else None


def crash_now() -> None:
    """What a node's OOM killer or a hardware fault does to a rank: no cleanup, no last words."""
    os.kill(os.getpid(), signal.SIGKILL)
