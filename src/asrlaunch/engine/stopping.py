"""A stop signal becomes one decision of every rank at a step boundary.

The signal handler only sets a flag (job/signals.py). At each step boundary the ranks agree whether any of
them was signalled (one all-reduce per step; none on one process); then, after the checkpoint, rank 0 says
what the stop was (`SlurmTask.stop_kind`) and requeues the job within the requeue budget, and every rank
logs the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from asrlaunch.core.recipe import ClusterSection
from asrlaunch.core.records import Event
from asrlaunch.job.signals import StopRequest
from asrlaunch.job.task import SlurmTask


@dataclass(frozen=True)
class Stop:
    kind: Event
    requeued: bool
    error: str | None = None  # why a stop that should requeue did not (the requeue budget)

    def fields(self) -> dict[str, Any]:
        return {"requeued": self.requeued, **({"error": self.error} if self.error else {})}


class StopDecision:
    def __init__(
        self, request: StopRequest, accelerator: Any, task: SlurmTask, cluster: ClusterSection
    ) -> None:
        self.request, self.accelerator, self.task, self.cluster = request, accelerator, task, cluster

    def agreed(self) -> bool:
        """Every rank stops at the same step if any rank was signalled."""
        if self.accelerator.num_processes == 1:
            return bool(self.request)
        flag = torch.tensor([1.0 if self.request else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def decide(self, step: int, resume_hint: str, saved: bool = True) -> Stop:
        """Rank 0 classifies the stop and requeues; every rank gets its decision. `saved`: whether the stop's
        checkpoint was written (else the run resumes from an older one)."""
        decided: list[Any] = [None]
        if self.accelerator.is_main_process:
            decided[0] = self._decide(step, resume_hint, saved)
        broadcast_object_list(decided)
        return decided[0]

    def _decide(self, step: int, resume_hint: str, saved: bool = True) -> Stop:
        kind = self.task.stop_kind(self.request.signal, self.cluster.signal_delay_s)
        lost = (
            ""
            if saved
            else f"the checkpoint of step {step} could not be written: it resumes from an older one"
        )
        if kind in (Event.TERMINATED, Event.SIGNAL) or not self.task.in_slurm:
            return Stop(kind, False, lost or None)
        if not self.task.within_requeue_budget(self.cluster.max_requeues, another=True):
            kept = f"the checkpoint of step {step} is kept" if saved else lost
            return Stop(
                kind,
                False,
                f"requeue limit reached (cluster.max_requeues={self.cluster.max_requeues}): {kept}; continue "
                f"with {resume_hint}",
            )
        return Stop(kind, self.task.requeue(), lost or None)
