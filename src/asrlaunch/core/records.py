"""Every record a run's logs hold, defined once: its kind, its event and each field with what it means.

`logs/rank<R>.jsonl` holds one JSON object per line (logs.py writes and reads them; history.py makes sense of
them). This module is the only place where a record kind or an event is spelled; `docs/log-format.md` is
generated from it (`python -m asrlaunch.core.records`, checked by a test). No torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What a record is: a start or an event of an attempt (`meta`), a logging window (`train`) or an
    evaluation (`eval`)."""

    META = "meta"
    TRAIN = "train"
    EVAL = "eval"


class Event(StrEnum):
    """What happened, in a `meta` record that is not a start. The first group ends an attempt (a stop)."""

    TIMEOUT = "timeout"  # SLURM's warning signal before the time limit: checkpoint, requeue
    PREEMPTION = "preemption"  # the scheduler preempts the job: checkpoint, requeue
    SIGNAL = "signal"  # a stop signal outside SLURM: checkpoint, stop
    TERMINATED = "terminated"  # SIGTERM that is no preemption (the user's scancel, a lost node): checkpoint
    FAILURE = "failure"  # the step failed (a rank died, hung or crashed): restarted, requeued or not
    HANG = "hang"  # the supervisor found a rank without progress and ended the step
    ERROR = "error"  # a rank stopped on an error a retry cannot fix (recipe, data, divergence, ...)
    CRASH = "crash"  # a rank stopped on an error a retry may fix
    OOM_SPLIT = "oom_split"  # out of memory: the micro-batch was halved
    CHECKPOINT = "checkpoint"  # a checkpoint was written
    CHECKPOINT_ERROR = "checkpoint_error"  # a checkpoint could not be written
    FAULT = "fault"  # an injected fault fired (ASRLAUNCH_FAULT; tests and soaks)

    @property
    def is_stop(self) -> bool:
        """The attempt ended with this event (what `status` counts as a stop)."""
        return self in STOPS

    @property
    def stopped_by_signal(self) -> bool:
        """The ranks checkpointed on a signal and logged the stop themselves (failover leaves it alone)."""
        return self in SIGNAL_STOPS


SIGNAL_STOPS = frozenset({Event.TIMEOUT, Event.PREEMPTION, Event.SIGNAL, Event.TERMINATED})
STOPS = SIGNAL_STOPS | {Event.FAILURE, Event.HANG}


@dataclass(frozen=True)
class Field:
    name: str
    doc: str


COMMON = (
    Field("kind", "`meta`, `train` or `eval`"),
    Field("step", "optimizer steps done"),
    Field("epoch", "step / steps per epoch"),
    Field("rank", "the rank that wrote it (failover and the supervisor write as rank 0)"),
    Field(
        "attempt",
        "0 on the first start, then one more at every start (in-job restart, requeue, `--resume`, rerun); "
        "never less than `SLURM_RESTART_COUNT`",
    ),
    Field("time", "unix seconds"),
)

START = (
    Field("world_size", "processes of this attempt"),
    Field(
        "plan",
        "this attempt's batch plan: global_batch, world_size, micro_batch, grad_accum, train_samples, "
        "steps_per_epoch, total_steps, epochs, warmup_steps, warmup_share",
    ),
    Field("versions", "python, torch, transformers, datasets, tokenizers, accelerate"),
    Field("recipe", "the resolved recipe"),
    Field("device", "torch device of this rank"),
    Field("resumed_from", "the checkpoint step this attempt resumed from (null on a fresh start)"),
    Field("job_id", "SLURM job id (null outside SLURM)"),
    Field("slurm_restart_count", "SLURM_RESTART_COUNT (requeues of the job so far)"),
    Field("nodes", "nodes of the job"),
    Field("host", "this rank's host name"),
    Field("node", "SLURM's name of this rank's node"),
    Field("local_rank", "rank on its node"),
    Field("cuda_visible_devices", "the GPUs SLURM gave this task"),
    Field("process_started", "unix time this rank's process started (start-up time = first step - this)"),
    Field("skipped_utterances", "bad utterances left out of the corpus (`data.skip_bad: true`)"),
    Field("cache", "`hit` when the prepared corpus was in the cache, `built` when this start prepared it"),
)

TRAIN = (
    Field("loss", "this rank's mean training loss over the steps since its last train record"),
    Field(
        "run_loss",
        "the mean of every rank's `loss`: the run's, as the trackers, the console and status show it",
    ),
    Field("lr", "learning rate after the step"),
    Field("grad_norm", "gradient norm after all-reduce, before clipping"),
    Field(
        "samples_per_s",
        "the job's samples per second over the steps this process trained since its last train record "
        "(evaluation and checkpoints excluded)",
    ),
    Field("step_s", "median wall time of a step in the window, seconds"),
    Field(
        "compute_s",
        "median time of this rank's own work in a step (its data, forward passes, and backward passes that "
        "do not synchronise gradients): what does not wait for the other ranks, seconds",
    ),
    Field("nonfinite_skipped", "optimizer steps skipped for non-finite gradients, whole run"),
    Field("ctc_infinite", "utterances so far with fewer CTC frames than their transcript needs"),
    Field("max_memory_gib", "on a GPU: this process's peak device memory so far"),
    Field("sample_ids", "with `logging.sample_ids: true`: this step's global batch"),
)

EVAL = (
    Field("eval_loss", "mean over utterances of each one's loss, as at batch size 1"),
    Field("wer", "word error rate over all utterances"),
    Field("eval_samples", "utterances evaluated"),
    Field("eval_seconds", "wall time of the evaluation"),
)

REQUEUED = Field("requeued", "whether the job was requeued")
ERROR = Field("error", "what happened, in one line, with what to do")
SIGNAL_STOP = (
    REQUEUED,
    Field(
        "checkpointed",
        "false when the stop's checkpoint could not be written (`checkpoint.on_error: continue`): the run "
        "resumes from an older one",
    ),
    Field("error", "why it was not requeued (a requeue limit), or that its checkpoint could not be written"),
)

EVENT_FIELDS: dict[Event, tuple[Field, ...]] = {
    Event.TIMEOUT: SIGNAL_STOP,
    Event.PREEMPTION: SIGNAL_STOP,
    Event.SIGNAL: SIGNAL_STOP,
    Event.TERMINATED: SIGNAL_STOP,
    Event.FAILURE: (
        Field("exit_status", "srun's exit status"),
        Field("failures", "failures of the run so far, this one included"),
        Field("job_id", "the SLURM job that failed (its failure budget is its own)"),
        Field("action", "`restart` (in this allocation), `requeue` or `none`"),
        REQUEUED,
        Field("retry", "false when no retry follows"),
        Field("errors", "the ranks' own last words (`rank R: Error: ...`)"),
        Field("first_rank", "the rank that failed first (by time)"),
        Field("first_node", "its node"),
        Field("first_exit", "how it ended: `exit code N`, `signal KILL`, `hang`, ..."),
        Field("first_output", "the last lines of its output"),
        Field("stacks", "the stacks' file, for a hang"),
        Field("excluded_nodes", "nodes the requeued job may no longer run on"),
        Field("excluded_why", "why they were left out"),
        Field(
            "late",
            "true when the time limit was too near for a restart to get its stop signal: requeued instead "
            "(no node left out), or restarted as a last chance when no requeue was left",
        ),
        ERROR,
    ),
    Event.HANG: (
        Field("hung_rank", "the rank without progress (the one not waiting for the others, when that shows)"),
        Field("suspects", "every rank without progress that was not waiting for a peer"),
        Field(
            "alike",
            "the suspects looked the same (the same step, all waiting or none, all silent or none): the "
            "stacks must say which hung, and no node is left out on its account",
        ),
        Field("node", "its node"),
        Field("phase", "what it was doing: startup, step, eval, checkpoint, final"),
        Field("stale_s", "seconds since its last progress"),
        Field("budget_s", "the phase's budget it exceeded"),
        Field("stacks", "file with the Python stacks of every thread of the ranks that could be read"),
        ERROR,
    ),
    Event.ERROR: (ERROR, Field("retry", "false"), Field("process_started", "as in the start record")),
    Event.CRASH: (ERROR, Field("retry", "true"), Field("process_started", "as in the start record")),
    Event.OOM_SPLIT: (Field("plan", "the new batch plan"), ERROR),
    Event.CHECKPOINT: (Field("seconds", "time the checkpoint took on this rank"),),
    Event.CHECKPOINT_ERROR: (ERROR,),
    Event.FAULT: (Field("fault", "the fault, as ASRLAUNCH_FAULT wrote it"),),
}

KIND_FIELDS: dict[Kind, tuple[Field, ...]] = {Kind.TRAIN: TRAIN, Kind.EVAL: EVAL}


def allowed_fields(kind: Kind, event: Event | None) -> set[str]:
    """The fields a record of this kind (and event) may carry besides the common ones."""
    if kind is Kind.META:
        fields = EVENT_FIELDS[event] if event is not None else START
        return {f.name for f in fields} | ({"event"} if event is not None else set())
    return {f.name for f in KIND_FIELDS[kind]}


def kind_of(record: dict[str, Any]) -> Kind:
    return Kind(record["kind"])


def event_of(record: dict[str, Any]) -> Event | None:
    """The event of a meta record (None for a start, and for train and eval records). An event this version
    does not know (a newer writer) reads as None."""
    value = record.get("event")
    try:
        return Event(value) if value else None
    except ValueError:
        return None


def is_start(record: dict[str, Any]) -> bool:
    """The meta record a rank writes when it starts (events are meta records too)."""
    return record["kind"] == Kind.META and not record.get("event")


def is_kind(record: dict[str, Any], kind: Kind) -> bool:
    return record["kind"] == kind


def _table(fields: tuple[Field, ...]) -> str:
    return "\n".join(f"| `{f.name}` | {f.doc} |" for f in fields)


def markdown() -> str:
    """docs/log-format.md's generated part."""
    header = "| field | meaning |\n|---|---|\n"
    parts = [
        "## Every record\n",
        header + _table(COMMON),
        "\n\n## `meta`, at every start of every rank\n",
        header + _table(START),
        "\n\n## `meta` events\n",
        "A `meta` record with `event` tells what happened to an attempt. "
        f"Stops (they end an attempt): {', '.join(f'`{e}`' for e in Event if e.is_stop)}.\n",
    ]
    for event in Event:
        parts.append(f"\n### `{event}`\n\n{header}{_table(EVENT_FIELDS[event])}\n")
    parts += [
        f"\n## `{Kind.TRAIN}`, every `logging.steps` and at the last step\n",
        header + _table(TRAIN),
        f"\n\n## `{Kind.EVAL}`, rank 0, every `eval.steps` and at the end\n",
        header + _table(EVAL),
        "\n",
    ]
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown())
