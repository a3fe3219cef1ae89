"""Batch and step arithmetic: pure functions, no torch.

The global batch is a property of the run. It is split as micro_batch x grad_accum x world_size, and
every micro-batch of one global batch is padded to the same length, so the world size changes only
the order of float summation, never what the model learns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asrlaunch.core.recipe import Recipe


class BatchPlanError(ValueError):
    """The global batch cannot be split over this world size."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class StepPlan:
    batch: BatchPlan
    train_samples: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int

    @property
    def warmup_share(self) -> float:
        return min(1.0, self.warmup_steps / self.total_steps)

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.batch.to_dict(),
            "train_samples": self.train_samples,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "warmup_steps": self.warmup_steps,
            "warmup_share": round(self.warmup_share, 4),
        }


def valid_world_sizes(global_batch: int, limit: int = 1024) -> list[int]:
    return [w for w in range(1, min(global_batch, limit) + 1) if global_batch % w == 0]


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """Split the global batch into (micro-batch, gradient accumulation) for `world_size` processes.

    Takes the largest micro-batch that fits `max_micro_batch`, so accumulation is as small as possible.
    """
    if global_batch < 1 or world_size < 1 or max_micro_batch < 1:
        raise BatchPlanError(
            f"global batch ({global_batch}), world size ({world_size}) and max micro-batch "
            f"({max_micro_batch}) must all be at least 1"
        )
    if global_batch % world_size:
        valid = ", ".join(map(str, valid_world_sizes(global_batch)))
        raise BatchPlanError(
            f"global batch {global_batch} cannot be split evenly over {world_size} processes; "
            f"use a world size (nodes x GPUs per node) that divides it: {valid}"
        )
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % m == 0)
    return BatchPlan(global_batch, world_size, micro, per_rank // micro)


def steps_per_epoch(train_samples: int, global_batch: int) -> int:
    """Optimizer steps per epoch; the last, partial global batch is filled up, as the Trainer counts it."""
    if train_samples < 1:
        raise BatchPlanError("the training set is empty")
    return math.ceil(train_samples / global_batch)


def plan_steps(
    batch: BatchPlan,
    train_samples: int,
    epochs: float,
    warmup_steps: int,
    max_steps: int | None = None,
) -> StepPlan:
    per_epoch = steps_per_epoch(train_samples, batch.global_batch)
    total = max_steps if max_steps is not None else math.ceil(epochs * per_epoch)
    return StepPlan(
        batch=batch,
        train_samples=train_samples,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=round(total / per_epoch, 4),
        warmup_steps=warmup_steps,
    )


def batch_plan(recipe: Recipe, world_size: int, micro_cap: int | None = None) -> BatchPlan:
    """The recipe's global batch on `world_size` processes; `micro_cap` is the micro-batch an out-of-memory
    split chose."""
    train = recipe.train
    micro_limit = min(train.max_micro_batch_size, micro_cap or train.global_batch_size)
    return plan_batch(train.global_batch_size, world_size, micro_limit)


def plan_run(
    recipe: Recipe, world_size: int, train_samples: int | None = None, micro_cap: int | None = None
) -> StepPlan:
    """The run's batch and step plan on `world_size` processes: the one place it is computed (the launcher
    plans with `data.expected_train_size` before the data is read, every start with the corpus it
    prepared)."""
    train = recipe.train
    batch = batch_plan(recipe, world_size, micro_cap)
    if train_samples is None:
        known = [n for n in (recipe.data.expected_train_size, recipe.data.max_train_samples) if n is not None]
        if not known:
            raise BatchPlanError(
                "data.expected_train_size: set it (TIMIT: 4620) so the launcher can plan the steps"
            )
        train_samples = min(known)
    return plan_steps(batch, train_samples, train.epochs, train.warmup_steps, train.max_steps)


def scheduled_lr(recipe: Recipe, step: int, total_steps: int) -> float:
    """The learning rate the schedule gives at `step` of `total_steps` (transformers' linear and constant
    schedules with warmup, the engine's two)."""
    train, warmup = recipe.train, recipe.train.warmup_steps
    if step < warmup:
        return train.lr * step / max(1, warmup)
    if train.lr_scheduler != "linear":
        return train.lr
    return train.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
