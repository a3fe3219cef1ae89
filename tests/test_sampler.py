"""The run's data order: independent of world size, length-grouped, padded per global batch."""

from __future__ import annotations

import numpy as np
import pytest

from asrlaunch.core.plan import plan_batch
from asrlaunch.data.sampler import (
    ORDERS,
    GlobalOrder,
    epoch_batches,
    padding_efficiency,
    rank_micro_batches,
    reference_epoch_batches,
)


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


@pytest.mark.parametrize("kind", ["grouped", "reference"])
def test_global_step_is_its_epochs_batch_whatever_the_world_size(kind: str) -> None:
    """Step k is batch k mod E of epoch k // E, each epoch shuffled anew; the world size only cuts it."""
    lengths = timit_like_lengths(700)
    order = GlobalOrder(lengths, 32, seed=42, kind=kind)
    assert order.steps_per_epoch == 22
    for step in [0, 1, 21, 22, 23, 60]:  # crosses epoch boundaries, and back (a resume reads any step)
        epoch, index = divmod(step, 22)
        expected = ORDERS[kind](lengths, 32, 42, epoch)[index]
        np.testing.assert_array_equal(order.batch(step), expected)
        assert order.pad_length(step) == lengths[expected].max()
        for world in (1, 2, 4, 8):
            plan = plan_batch(32, world, 4)
            per_rank = [rank_micro_batches(expected, plan, r) for r in range(world)]
            in_order = [per_rank[r][k] for k in range(plan.grad_accum) for r in range(world)]
            np.testing.assert_array_equal(np.concatenate(in_order), expected)
    first, second = (np.concatenate([order.batch(s) for s in range(e * 22, e * 22 + 3)]) for e in (0, 1))
    assert not np.array_equal(np.sort(first), np.sort(second))  # epoch 1 is not epoch 0 again


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


def trainer_length_grouped(lengths: list[int], batch: int, permutation: list[int]) -> list[int]:
    """transformers 4.15's `get_length_grouped_indices` (what `--group_by_length` samples at world size 1),
    written out in plain Python from its source, fed with our permutation."""
    mega_batch_mult = min(len(lengths) // (batch * 4), 50)
    if mega_batch_mult == 0:
        mega_batch_mult = 1
    megabatch_size = mega_batch_mult * batch
    megabatches = [permutation[i : i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatch_maximums = [lengths[megabatch[0]] for megabatch in megabatches]
    max_idx = megabatch_maximums.index(max(megabatch_maximums))
    megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


@pytest.mark.parametrize(("count", "steps", "last"), [(4620, 145, 12), (77, 3, 13)])
def test_the_reference_order_is_the_trainers_length_grouped_order(count: int, steps: int, last: int) -> None:
    lengths = timit_like_lengths(count)
    batches = reference_epoch_batches(lengths, 32, seed=42, epoch=3)
    permutation = np.random.default_rng([42, 3]).permutation(count).tolist()
    assert np.concatenate(batches).tolist() == trainer_length_grouped(lengths.tolist(), 32, permutation)
    # the same rules, checked one by one
    assert [len(b) for b in batches] == [32] * (steps - 1) + [last]  # the last batch partial, not filled
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(count))  # every sample once per epoch
    assert lengths[batches[0]].max() == lengths.max() == lengths[flat[0]]  # the longest opens the epoch
    size = min(count // 128, 50) * 32 or 32  # 36 batches for TIMIT
    for start in range(0, count, size):
        megabatch = lengths[flat[start : start + size]]
        assert (np.diff(megabatch[1:]) <= 0).all()  # longest first (the first place: the swap's)
    assert GlobalOrder(lengths, 32, 42, "reference").steps_per_epoch == steps


def test_a_partial_batch_is_cut_by_samples_over_ranks_and_micro_steps() -> None:
    batch = np.arange(4)  # the epoch's last batch of a global batch of 12
    four, two = plan_batch(12, 4, 3), plan_batch(12, 2, 3)
    assert [rank_micro_batches(batch, four, r)[0].tolist() for r in range(4)] == [[0, 1, 2], [3], [], []]
    assert [[m.tolist() for m in rank_micro_batches(batch, two, r)] for r in range(2)] == [
        [[0, 1, 2], []],
        [[3], []],
    ]
