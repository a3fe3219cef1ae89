"""The trainer's state that is not tensors: the resume decision every rank follows, and the counters a
checkpoint carries."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from asrlaunch.core.history import RunHistory
from asrlaunch.core.rundir import RunDir
from asrlaunch.engine import checkpoint


@dataclass(frozen=True)
class ResumeDecision:
    """What rank 0 decides at a start and broadcasts, so that every rank resumes from the same checkpoint:
    the attempt number and the newest checkpoint that passes verification (with the world size that saved it:
    ZeRO shards of another world size need DeepSpeed's universal loader, chosen before `prepare`). `start`
    names this start alone: an attempt that died before it was logged is numbered again by the next."""

    attempt: int
    checkpoint: str | None = None
    saved_world_size: int | None = None
    start: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @classmethod
    def decide(cls, run_dir: RunDir, history: RunHistory, restart_count: int) -> ResumeDecision:
        attempt = history.next_attempt(restart_count)
        found = checkpoint.newest_complete(run_dir.checkpoints)
        if found is None:
            return cls(attempt)
        folder, manifest = found
        return cls(attempt, str(folder), manifest.get("world_size"))


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


@dataclass
class TrainCounters:
    """Counters that must survive a resume, so the resumed run logs what the uninterrupted one would."""

    nonfinite_total: int = 0  # optimizer steps skipped for non-finite gradients, whole run
    nonfinite_in_a_row: int = 0
    ctc_infinite_total: int = 0  # utterances with fewer CTC frames than their transcript needs, whole run

    def count_update(self, skipped: bool, max_in_a_row: int) -> None:
        """One optimizer update, skipped for non-finite gradients or not; too many skipped in a row stop the
        run."""
        self.nonfinite_total += int(skipped)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if self.nonfinite_in_a_row >= max_in_a_row:
            raise TrainingDivergedError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had non-finite gradients; lower "
                "train.lr, raise train.warmup_steps or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for counter in fields(self):
            setattr(self, counter.name, int(state.get(counter.name, 0)))
