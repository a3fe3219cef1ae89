from __future__ import annotations

import pytest

from asrlaunch.core.plan import BatchPlanError, plan_batch, plan_steps, steps_per_epoch, valid_world_sizes


@pytest.mark.parametrize("world", range(1, 65))
@pytest.mark.parametrize("max_micro", [1, 2, 3, 4, 5, 8, 16, 32])
def test_plan_multiplies_back_to_the_global_batch_or_explains(world: int, max_micro: int) -> None:
    if 32 % world:
        explained = rf"over {world} processes; .*divides it: 1, 2, 4, 8, 16, 32$"
        with pytest.raises(BatchPlanError, match=explained):
            plan_batch(32, world, max_micro)
        return
    plan = plan_batch(32, world, max_micro)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == 32
    assert plan.micro_batch <= max_micro
    # the largest micro-batch that fits, so the smallest accumulation
    assert all((32 // world) % m for m in range(plan.micro_batch + 1, min(max_micro, 32 // world) + 1))


@pytest.mark.parametrize(
    ("world", "max_micro", "micro", "accum"),
    [(1, 32, 32, 1), (1, 8, 8, 4), (2, 32, 16, 1), (2, 4, 4, 4), (8, 32, 4, 1), (32, 32, 1, 1), (4, 3, 2, 4)],
)
def test_known_splits(world: int, max_micro: int, micro: int, accum: int) -> None:
    plan = plan_batch(32, world, max_micro)
    assert (plan.micro_batch, plan.grad_accum) == (micro, accum)


def test_impossible_split_names_the_valid_world_sizes() -> None:
    with pytest.raises(BatchPlanError) as error:
        plan_batch(32, 3, 32)
    assert "3 processes" in str(error.value)
    assert "1, 2, 4, 8, 16, 32" in str(error.value)
    assert valid_world_sizes(12) == [1, 2, 3, 4, 6, 12]


def test_nonsense_inputs_are_refused() -> None:
    for args in [(0, 1, 1), (32, 0, 1), (32, 1, 0)]:
        with pytest.raises(BatchPlanError):
            plan_batch(*args)


def test_timit_steps_match_the_reference_card() -> None:
    plan = plan_steps(plan_batch(32, 8, 32), train_samples=4620, epochs=20, warmup_steps=1000)
    assert plan.steps_per_epoch == 145
    assert plan.total_steps == 2900
    assert round(plan.epoch_at(100), 2) == 0.69  # the card's first row
    assert round(plan.epoch_at(1500), 2) == 10.34
    assert plan.warmup_share == pytest.approx(1000 / 2900)


def test_max_steps_overrides_epochs() -> None:
    plan = plan_steps(plan_batch(32, 1, 8), train_samples=4620, epochs=20, warmup_steps=10, max_steps=12)
    assert plan.total_steps == 12
    assert plan.epochs == pytest.approx(12 / 145, abs=1e-4)


def test_partial_last_batch_counts_as_a_step() -> None:
    assert steps_per_epoch(4620, 32) == 145
    assert steps_per_epoch(4608, 32) == 144
    assert steps_per_epoch(5, 32) == 1
    with pytest.raises(BatchPlanError, match="empty"):
        steps_per_epoch(0, 32)
