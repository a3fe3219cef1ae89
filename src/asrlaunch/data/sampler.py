"""The run's sample order: seeded, length-grouped global batches, then sharded to ranks and micro-steps.

The order depends on (seed, epoch, lengths, global batch, `data.order`) only, never on the world size or the
attempt: global step k holds the same samples on 1 or 64 processes and after any number of resumes. Two
orders: `grouped` (ours, `epoch_batches`) and `reference` (the Trainer's LengthGroupedSampler of the reference
card's run, `reference_epoch_batches`), whose last batch of an epoch is partial. numpy only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from asrlaunch.core.plan import BatchPlan, steps_per_epoch

# Length grouping sorts within chunks of this many global batches. A deliberate design, not the Trainer's:
# its LengthGroupedSampler sorts megabatches of min(len // (batch * 4), 50) per-device batches (36 for TIMIT
# at 32), longest first, in megabatch order; ours sorts chunks of 50 *global* batches and shuffles the
# batches, so the order is the same on every world size.
GROUP_CHUNK_BATCHES = 50


def epoch_batches(
    lengths: Sequence[int] | np.ndarray,
    global_batch: int,
    seed: int,
    epoch: int,
    group_chunk: int = GROUP_CHUNK_BATCHES,
) -> list[np.ndarray]:
    """The global batches of one epoch, as arrays of sample indices.

    A seeded permutation, filled up to whole batches by wrapping around (so every step has exactly
    `global_batch` samples), sorted by length within chunks of `group_chunk` batches so that a batch
    holds similar lengths, then the batches shuffled; the batch with the longest sample goes first so a
    run that does not fit in memory fails at its first step rather than hours later.
    """
    lengths = np.asarray(lengths)
    count = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = np.resize(rng.permutation(count), steps_per_epoch(count, global_batch) * global_batch)
    chunk = global_batch * group_chunk
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i : i + global_batch] for i in range(0, len(part), global_batch))
    shuffled = [batches[i] for i in rng.permutation(len(batches))]
    longest = int(np.argmax([lengths[b].max() for b in shuffled]))
    shuffled.insert(0, shuffled.pop(longest))
    return shuffled


def reference_epoch_batches(
    lengths: Sequence[int] | np.ndarray, global_batch: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The global batches of one epoch in the order of transformers' LengthGroupedSampler (4.15, one process,
    batch = the global batch), the reference card's `--group_by_length`: a permutation cut into megabatches of
    `min(n // (batch * 4), 50)` batches, each sorted longest first (stable), the first sample of the first
    megabatch swapped with that of the megabatch holding the longest sample, batches taken in order, and the
    last batch of the epoch partial (no drop_last). The permutation is ours (`default_rng([seed, epoch])`)."""
    lengths = np.asarray(lengths)
    count = len(lengths)
    indices = np.random.default_rng([seed, epoch]).permutation(count)
    size = (min(count // (global_batch * 4), 50) or 1) * global_batch
    megabatches = [indices[i : i + size] for i in range(0, count, size)]
    megabatches = [mb[np.argsort(-lengths[mb], kind="stable")] for mb in megabatches]
    longest = int(np.argmax([lengths[mb[0]] for mb in megabatches]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    order = np.concatenate(megabatches)
    return [order[i : i + global_batch] for i in range(0, count, global_batch)]


ORDERS = {"grouped": epoch_batches, "reference": reference_epoch_batches}


def rank_micro_batches(batch: np.ndarray, plan: BatchPlan, rank: int) -> list[np.ndarray]:
    """The micro-batches that `rank` processes for one global batch, in accumulation order. The global
    batch is cut by samples: micro-batch (step s, rank r) holds samples [(s*W + r)*m, (s*W + r + 1)*m); in a
    partial batch (the reference order's last of an epoch) later micro-batches hold fewer, or none."""
    if len(batch) > plan.global_batch:
        raise ValueError(f"a global batch holds at most {plan.global_batch} samples, got {len(batch)}")
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank {rank} is outside the world of {plan.world_size}")
    size, world = plan.micro_batch, plan.world_size
    return [
        batch[(step * world + rank) * size : (step * world + rank + 1) * size]
        for step in range(plan.grad_accum)
    ]


@dataclass
class GlobalOrder:
    """Step-indexed access to the run's global batches (epochs are built lazily and cached)."""

    lengths: np.ndarray
    global_batch: int
    seed: int
    kind: str = "grouped"
    _epochs: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.lengths), self.global_batch)

    def batch(self, step: int) -> np.ndarray:
        """Sample indices of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: ORDERS[self.kind](self.lengths, self.global_batch, self.seed, epoch)}
        return self._epochs[epoch][index]

    def pad_length(self, step: int) -> int:
        """Every micro-batch of a step is padded to its global batch's longest sample."""
        return int(self.lengths[self.batch(step)].max())


def padding_efficiency(lengths: np.ndarray, steps: Sequence[np.ndarray | Sequence[int]]) -> float:
    """Real frames / padded frames, where all samples of one step cost the step's longest sample.

    That is the cost model of data parallelism: the slowest rank bounds every step.
    """
    real = padded = 0
    for step in steps:
        sizes = lengths[np.asarray(step)]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(sizes)
    return real / padded


def eval_batches(lengths: np.ndarray | Sequence[int], max_padded_samples: int) -> list[list[int]]:
    """Evaluation batches: utterances sorted longest first, each batch as many as fit `max_padded_samples`
    of padded audio (its first, longest utterance times its size); an utterance longer than that alone."""
    lengths = np.asarray(lengths)
    batches: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable").tolist():
        if batches and int(lengths[batches[-1][0]]) * (len(batches[-1]) + 1) <= max_padded_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def shard_batches(
    batches: Sequence[list[int]], lengths: np.ndarray | Sequence[int], world: int
) -> list[list[list[int]]]:
    """Batches dealt to `world` ranks balanced by padded audio (largest first, each to the least loaded rank),
    so no rank waits long for the slowest at the gather. Every rank computes the same deal."""
    lengths = np.asarray(lengths)
    costs = [int(lengths[batch[0]]) * len(batch) for batch in batches]
    loads: list[int] = [0] * world
    shares: list[list[list[int]]] = [[] for _ in range(world)]
    for index in sorted(range(len(batches)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(list(batches[index]))
        loads[rank] += costs[index]
    return shares
