"""The trainer's state that is not tensors: the resume decision every rank follows, and the counters a
checkpoint carries. Pure (no torch), so the launcher side and tests can read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from asrlaunch import checkpoint
from asrlaunch.logs import meta_records, next_attempt
from asrlaunch.rundir import RunDir


@dataclass(frozen=True)
class ResumeDecision:
    """What rank 0 decides at a start and broadcasts, so that every rank resumes from the same checkpoint:
    the attempt number and the newest checkpoint that passes verification (with the world size that saved it:
    ZeRO shards of another world size need DeepSpeed's universal loader, chosen before `prepare`)."""

    attempt: int
    checkpoint: str | None = None
    saved_world_size: int | None = None

    @classmethod
    def decide(cls, run_dir: RunDir) -> ResumeDecision:
        found = checkpoint.newest_complete(run_dir.checkpoints)
        if found is None:
            return cls(next_attempt(run_dir))
        folder, manifest = found
        return cls(next_attempt(run_dir), str(folder), manifest.get("world_size"))


def oom_micro_cap(run_dir: RunDir) -> int | None:
    """The smallest micro-batch an out-of-memory split chose in this run (every rank reads the same logs
    before its start is logged, so all agree): a new start begins there rather than failing again."""
    splits = [
        m["plan"]["micro_batch"]
        for log in run_dir.rank_logs().values()
        for m in meta_records(log)
        if m.get("event") == "oom_split"
    ]
    return min(splits, default=None)


@dataclass
class TrainCounters:
    """Counters that must survive a resume, so the resumed run logs what the uninterrupted one would."""

    nonfinite_total: int = 0  # optimizer steps skipped for non-finite gradients, whole run
    nonfinite_in_a_row: int = 0
    ctc_infinite_total: int = 0  # utterances with fewer CTC frames than their transcript needs, whole run

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in fields(self):
            setattr(self, field.name, int(state.get(field.name, 0)))
