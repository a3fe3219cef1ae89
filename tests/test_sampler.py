"""The run's data order: independent of world size, length-grouped, padded per global batch."""

from __future__ import annotations

import numpy as np
import pytest

from asrlaunch.core.plan import plan_batch
from asrlaunch.data.sampler import GlobalOrder, epoch_batches, padding_efficiency, rank_micro_batches


def timit_like_lengths(count: int = 4620, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(3.0), 0.3, count), 0.9, 7.8)
    return (seconds * 16000).astype(np.int64)


def test_every_sample_once_per_epoch_and_whole_batches() -> None:
    lengths = timit_like_lengths()
    batches = epoch_batches(lengths, 32, seed=42, epoch=0)
    assert len(batches) == 145
    assert all(len(b) == 32 for b in batches)
    flat = np.concatenate(batches)
    assert set(flat.tolist()) == set(range(4620))  # 12 wrap-around repeats fill the last batch
    assert len(flat) - len(set(flat.tolist())) == 145 * 32 - 4620


def test_order_depends_on_seed_and_epoch_only() -> None:
    lengths = timit_like_lengths(500)
    a, b = epoch_batches(lengths, 32, 42, 0), epoch_batches(lengths, 32, 42, 0)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, epoch_batches(lengths, 32, 42, 1), strict=True))
    assert any((x != y).any() for x, y in zip(a, epoch_batches(lengths, 32, 7, 0), strict=True))


def test_longest_batch_comes_first() -> None:
    lengths = timit_like_lengths(1000)
    batches = epoch_batches(lengths, 32, 42, 3)
    assert lengths[batches[0]].max() == lengths.max()


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("max_micro", [32, 4, 1])
def test_ranks_and_micro_steps_partition_the_global_batch(world: int, max_micro: int) -> None:
    plan = plan_batch(32, world, max_micro)
    batch = np.arange(100, 132)
    pieces = [m for rank in range(world) for m in rank_micro_batches(batch, plan, rank)]
    assert len(pieces) == world * plan.grad_accum
    assert all(len(p) == plan.micro_batch for p in pieces)
    assert sorted(np.concatenate(pieces).tolist()) == batch.tolist()


def test_global_step_samples_are_the_same_for_every_world_size() -> None:
    lengths = timit_like_lengths(700)
    order = GlobalOrder(lengths, 32, seed=42)
    for step in [0, 1, 21, 22, 23, 60]:  # crosses epoch boundaries (22 steps per epoch)
        seen = []
        for world in (1, 2, 4, 8):
            plan = plan_batch(32, world, 4)
            parts = [m for r in range(world) for m in rank_micro_batches(order.batch(step), plan, r)]
            seen.append(sorted(np.concatenate(parts).tolist()))
        assert all(s == seen[0] for s in seen)
        assert order.pad_length(step) == lengths[order.batch(step)].max()


def test_padding_efficiency_beats_random_batches() -> None:
    lengths = timit_like_lengths()
    grouped = epoch_batches(lengths, 32, 42, 0)
    rng = np.random.default_rng(0)
    random = np.array_split(rng.permutation(len(lengths)), 145)
    assert padding_efficiency(lengths, grouped) >= 0.97
    assert padding_efficiency(lengths, random) < 0.7


def test_rank_outside_world_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        rank_micro_batches(np.arange(32), plan_batch(32, 2, 32), 2)
